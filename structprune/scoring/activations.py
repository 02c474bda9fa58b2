"""What the calibration data feeds each weighted layer: per input feature, its mean, spread and norm.

Large language models route their signal through a few feature channels whose activations are
orders of magnitude larger than the rest, so a weight's magnitude alone says little about what
removing it costs. Activation-aware criteria (Wanda, FLAP) and bias compensation read, for every
layer that multiplies its input by a weight (``nn.Linear``, convolutions, Hugging Face's ``Conv1D``),
statistics of that input per feature: how many positions were seen, their sum and their sum of
squares. A forward pre-hook folds each calibration batch into those sums (float64), so memory is
bounded by one batch's activations, which the forward holds anyway, and never grows with the data.

Statistics are keyed by the canonical name of the weight that consumes the input (the name the
dependency graph's channel spaces use), together with the weight's input dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import InvalidOptionError
from ..graph.capture import eval_mode
from ..graph.dependency_graph import canonical_names
from ..ops.registry import input_axis


@dataclass
class InputStatistics:
    """One weighted layer's input, per feature: ``count`` positions seen, their ``total`` and ``squares``, and the
    ``lowest`` and ``highest`` value.

    ``axis`` is the weight's dim that consumes the features (1 for a linear or conv weight, 0 for
    GPT-2's transposed ``Conv1D``); ``groups`` is a convolution's group count."""

    axis: int
    groups: int = 1
    count: int = 0
    total: Optional[torch.Tensor] = None
    squares: Optional[torch.Tensor] = None
    lowest: Optional[torch.Tensor] = None
    highest: Optional[torch.Tensor] = None

    def add(self, features: torch.Tensor) -> None:
        """Fold in a (positions, features) matrix."""
        features = features.detach().float()
        total, squares = features.sum(0).double(), features.square().sum(0).double()
        lowest, highest = features.amin(0), features.amax(0)
        if self.total is None or self.squares is None or self.lowest is None or self.highest is None:
            self.total, self.squares, self.lowest, self.highest = total, squares, lowest, highest
        else:
            self.total += total
            self.squares += squares
            self.lowest, self.highest = torch.minimum(self.lowest, lowest), torch.maximum(self.highest, highest)
        self.count += features.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each feature over every position seen."""
        assert self.total is not None
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of each feature (FLAP's "fluctuation")."""
        assert self.squares is not None
        return (self.squares / max(self.count, 1) - self.mean.square()).clamp_min(0)

    @property
    def constant(self) -> torch.Tensor:
        """Whether each feature took one value at every position seen."""
        assert self.lowest is not None and self.highest is not None
        return self.lowest == self.highest

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each feature over every position seen (Wanda's ``||X_j||``)."""
        assert self.squares is not None
        return self.squares.sqrt()


def run_batch(model: nn.Module, batch: Any, **extra: Any) -> Any:
    """Call ``model`` on a calibration batch: a tensor, a mapping of keyword inputs, an ``(inputs, targets)``
    pair (the inputs are used), or a tuple of positional inputs; ``extra`` keywords are passed along
    (``output_hidden_states=True``)."""
    if isinstance(batch, torch.Tensor):
        return model(batch, **extra)
    if isinstance(batch, Mapping):
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        inputs = batch[0] if len(batch) == 2 else batch
        if isinstance(inputs, torch.Tensor):
            return model(inputs, **extra)
        if isinstance(inputs, Mapping):
            return model(**inputs, **extra)
        return model(*inputs, **extra)
    raise InvalidOptionError(f"a calibration batch must be a tensor, a dict of inputs or an (inputs, targets) "
                             f"pair; got {type(batch).__name__}")


def _features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as (positions, features): channels are dim 1 of a convolution's input, the last dim of a
    linear layer's."""
    if isinstance(module, nn.modules.conv._ConvNd) and x.dim() > 2:
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def weighted_layers(model: nn.Module) -> List[Tuple[str, str, nn.Module]]:
    """(module path, canonical weight name, module) of every layer that multiplies its input by a weight whose
    input features the statistics describe (transposed convolutions excluded: their inputs are grouped
    differently)."""
    canonical = canonical_names(dict(model.named_parameters()))
    layers = []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if input_axis(module, "weight") is None or not isinstance(weight, torch.Tensor) or id(weight) not in canonical:
            continue
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            continue
        layers.append((path, canonical[id(weight)], module))
    return layers


def watch_inputs(layers: Iterable[Tuple[str, str, nn.Module]], statistics: Dict[str, InputStatistics]) -> List[Any]:
    """Forward pre-hooks folding every input of ``layers`` (from :func:`weighted_layers`) into ``statistics``,
    keyed by canonical weight name; returns the hook handles (remove them when done)."""
    handles = []
    for _, name, module in layers:
        axis = input_axis(module, "weight")
        assert axis is not None
        stats = statistics.setdefault(name, InputStatistics(axis, int(getattr(module, "groups", 1))))
        handles.append(module.register_forward_pre_hook(_recorder(stats)))
    return handles


def _recorder(stats: InputStatistics) -> Any:
    def record(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            stats.add(_features(module, args[0]))
    return record


@dataclass
class ActivationCollector:
    """Streams calibration batches through ``model`` and keeps :class:`InputStatistics` per weighted layer."""

    model: nn.Module
    statistics: Dict[str, InputStatistics] = field(default_factory=dict)

    def collect(self, data: Optional[Iterable], run: Callable[[nn.Module, Any], Any] = run_batch
                ) -> Dict[str, InputStatistics]:
        """Statistics over every batch of ``data``, each fed to the model by ``run(model, batch)``."""
        if data is None:
            raise InvalidOptionError("activation-aware criteria need calibration data: pass data=<batches or "
                                     "DataLoader> (token tensors, dicts of model inputs, or (inputs, targets) pairs)")
        handles = watch_inputs(weighted_layers(self.model), self.statistics)
        batches = 0
        try:
            with eval_mode(self.model), torch.no_grad():
                for batch in data:
                    run(self.model, batch)
                    batches += 1
        finally:
            for handle in handles:
                handle.remove()
        if batches == 0:
            raise InvalidOptionError("the calibration data yielded no batches; pass a non-empty data=...")
        return {name: stats for name, stats in self.statistics.items() if stats.count}


def per_weight_column(stats: InputStatistics, weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (one per input feature) laid out along the weight's input dim, broadcastable against it.

    A grouped convolution's filter ``o`` reads the input channels of its own group, so its column ``c``
    is input channel ``group(o) * in_per_group + c``."""
    values = values.to(weight.device, torch.float32)
    shape = [1] * weight.dim()
    if stats.groups > 1 and stats.axis == 1:
        per_group = weight.shape[1]
        out_per_group = weight.shape[0] // stats.groups
        matrix = values.reshape(stats.groups, per_group).repeat_interleave(out_per_group, dim=0)
        return matrix.reshape(weight.shape[0], per_group, *([1] * (weight.dim() - 2)))
    shape[stats.axis] = weight.shape[stats.axis]
    return values.reshape(shape)


__all__ = ["ActivationCollector", "InputStatistics", "per_weight_column", "run_batch", "watch_inputs",
           "weighted_layers"]
