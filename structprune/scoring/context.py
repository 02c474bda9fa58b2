"""What a criterion sees: the model, its groups, calibration data, and statistics computed once.

One :class:`ScoringContext` serves channel criteria (``slim``, ``SoftPruner``, channel masks, the
regularisers) and element criteria (``sparsify``) alike, so a registered criterion works everywhere and
gradients are collected one way: :class:`GradientCollector`, in eval mode (BatchNorm statistics are
never touched), with ``torch.autograd.grad`` (no ``.grad`` fields or hooks are left on the model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOptionError
from ..graph.capture import eval_mode
from ..graph.dependency_graph import named_tensors
from ..options import REDUCTIONS, check_choice
from ..tools.outputs import logits_of
from .activations import ActivationCollector, InputStatistics

if TYPE_CHECKING:
    from ..graph.dependency_graph import DependencyGraph, Group
    from ..graph.labels import Space

LossFn = Callable[[nn.Module, Any], torch.Tensor]


_LOSS_FN_HINT = ("pass your own loss, loss_fn=lambda model, batch: ...; for a Hugging Face language model with "
                 "(input_ids, labels) batches: loss_fn=lambda model, batch: model(input_ids=batch[0], "
                 "labels=batch[1]).loss")


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of ``model(inputs)`` against ``targets`` for an ``(inputs, targets)`` batch.

    Any other kind of batch or model output (a language model's ``(batch, tokens, vocabulary)`` logits)
    raises :class:`InvalidOptionError` saying what the default loss does and how to pass one that fits,
    instead of PyTorch's ``Expected target size ...``."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise InvalidOptionError("calibration batches must be (inputs, targets) pairs for the default "
                                 f"cross-entropy loss; {_LOSS_FN_HINT}")
    inputs, targets = batch
    output = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    return _cross_entropy(logits_of(output), targets)


def _cross_entropy(logits: Any, targets: Any) -> torch.Tensor:
    """``F.cross_entropy(logits, targets)``, or :class:`InvalidOptionError` naming both shapes when they do not
    fit (the error a loss mismatch gives is PyTorch's, about sizes, with no word of ``loss_fn``)."""
    try:
        return F.cross_entropy(logits, targets)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        shapes = f"logits {_shape(logits)} against targets {_shape(targets)}"
        raise InvalidOptionError(
            f"the default loss of gradient criteria is cross-entropy of the model's logits (its output, "
            f"output.logits or output[0]) against the targets of (inputs, targets) batches, and it does not fit "
            f"this model: {shapes} failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]}). "
            f"{_LOSS_FN_HINT[0].upper()}{_LOSS_FN_HINT[1:]}") from error


def _shape(value: Any) -> str:
    return f"of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"of type {type(value).__name__}"


GRADIENT_KINDS = ("abs", "channel_taylor", "element_taylor")


@dataclass
class GradientStatistics:
    """What the calibration batches say about one parameter; only the kinds a criterion asked for are
    collected (the others stay None), so Taylor scoring of a large model holds no per-weight buffer.

    ``abs``: mean |dL/dw| over batches, per element. ``channel_taylor[d]``: for dims 0 and 1, the sum
    over batches of |per-channel sum of w * dL/dw| (Molchanov's first-order Taylor score of a channel).
    ``element_taylor``: the sum over batches of |w * dL/dw| per element.
    """

    abs: Optional[torch.Tensor] = None
    channel_taylor: Optional[List[torch.Tensor]] = None
    element_taylor: Optional[torch.Tensor] = None

    def buffers(self) -> List[torch.Tensor]:
        return [b for b in (self.abs, *(self.channel_taylor or ()), self.element_taylor) if b is not None]


def _channel_sums(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every axis but ``dim`` (float64)."""
    return values.movedim(dim, 0).reshape(values.shape[dim], -1).sum(1).double()


def _empty_statistics(tensor: torch.Tensor, kinds: FrozenSet[str]) -> GradientStatistics:
    return GradientStatistics(
        torch.zeros_like(tensor) if "abs" in kinds else None,
        [torch.zeros(tensor.shape[d], dtype=torch.float64, device=tensor.device) for d in range(min(tensor.ndim, 2))]
        if "channel_taylor" in kinds else None,
        torch.zeros_like(tensor) if "element_taylor" in kinds else None)


class GradientCollector:
    """Accumulate gradient statistics of every parameter over calibration batches, in one pass.

    Under torch.distributed the sums are all-reduced, so every rank scores (and prunes) identically.
    """

    def __init__(self, model: nn.Module, data: Optional[Iterable], loss_fn: Optional[LossFn]):
        if data is None:
            raise InvalidOptionError("gradient-based criteria need calibration data: pass data=<batches or "
                                     "DataLoader> (and loss_fn=... unless batches are (inputs, targets) pairs)")
        self.model, self.data, self.loss_fn = model, data, loss_fn or default_loss

    def collect(self, kinds: Iterable[str] = ("abs", "channel_taylor")) -> Dict[str, GradientStatistics]:
        """The statistics of ``kinds`` (see :data:`GRADIENT_KINDS`) for every parameter."""
        wanted = frozenset(kinds)
        params = dict(self.model.named_parameters())
        names, tensors = list(params), list(params.values())
        flags = [t.requires_grad for t in tensors]
        stats = [_empty_statistics(t, wanted) for t in tensors]
        batches = 0
        try:
            # frozen layers (requires_grad=False) are scored too; the finally below restores every flag
            for t in tensors:
                t.requires_grad_(True)
            # eval mode: BatchNorm statistics stay put and dropout is off, so slim and sparsify score alike
            with eval_mode(self.model), torch.enable_grad():
                for batch in self.data:
                    loss = self.loss_fn(self.model, batch)
                    # autograd.grad leaves no .grad behind; allow_unused: parameters off the loss path get None
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    for stat, tensor, grad in zip(stats, tensors, grads):
                        if grad is not None:
                            self._accumulate(stat, tensor.detach(), grad)
                    batches += 1
        finally:
            for t, flag in zip(tensors, flags):
                t.requires_grad_(flag)
        if batches == 0:
            raise InvalidOptionError("the calibration data yielded no batches; pass a non-empty data=...")
        self._all_reduce(stats, batches)
        return dict(zip(names, stats))

    @staticmethod
    def _accumulate(stat: GradientStatistics, weight: torch.Tensor, grad: torch.Tensor) -> None:
        if stat.abs is not None:
            stat.abs += grad.abs()
        if stat.channel_taylor is None and stat.element_taylor is None:
            return
        product = weight * grad
        # sum w * g over the channel first, then take |.|: signs cancel within a batch, not across batches
        # (Molchanov et al.'s estimate of the loss change when the whole channel goes)
        for dim, total in enumerate(stat.channel_taylor or ()):  # |per-channel w*g| of this batch
            total += _channel_sums(product, dim).abs()
        if stat.element_taylor is not None:
            stat.element_taylor += product.abs()

    @staticmethod
    def _all_reduce(stats: List[GradientStatistics], batches: int) -> None:
        # the batch count is all-reduced as well: ranks may see different numbers of batches
        counts = torch.tensor([float(batches)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for stat in stats:
                for buffer in stat.buffers():
                    torch.distributed.all_reduce(buffer)
            torch.distributed.all_reduce(counts)
        for stat in stats:
            # only ``abs`` is a mean; the Taylor scores are sums over batches, as their definition says
            if stat.abs is not None:
                stat.abs /= counts.item()


@dataclass
class ScoringContext:
    """Everything a criterion may need, with per-tensor statistics computed once and shared.

    Attributes:
        model: the model being scored (its tensors are read, never changed).
        graph: the :class:`~structprune.DependencyGraph` (None when only element scores are asked for).
        data: calibration batches for gradient criteria (any iterable, e.g. a DataLoader).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: :func:`default_loss`.
        reduction: how member scores combine into a unit score: ``mean``, ``sum`` or ``max``.
        seed: seed of the ``random`` criterion (and nothing else).
    """

    model: nn.Module
    graph: Optional["DependencyGraph"] = None
    data: Optional[Iterable] = None
    loss_fn: Optional[LossFn] = None
    reduction: str = "mean"
    seed: Optional[int] = None
    _tensors: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _sums: Dict[tuple, Dict[int, np.ndarray]] = field(default_factory=dict, repr=False)
    _grads: Optional[Dict[str, GradientStatistics]] = field(default=None, repr=False)
    _grad_kinds: Set[str] = field(default_factory=set, repr=False)
    _activations: Optional[Dict[str, InputStatistics]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_choice("reduction", self.reduction, REDUCTIONS)
        self._tensors = named_tensors(self.model)

    # ----- tensors and per-axis statistics -----------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def trainable_members(self, group: "Group") -> Iterator[Tuple["Space", np.ndarray, torch.Tensor]]:
        """(space, unit index, parameter) of every trainable member (running statistics excluded)."""
        for space, index in zip(group.spaces, group.unit_index):
            t = self._tensors[space.tensor]
            if isinstance(t, nn.Parameter):
                yield space, index, t

    def axis_sums(self, name: str, values: Callable[[], torch.Tensor], key: str, dim: int) -> np.ndarray:
        """Sum of ``values()`` (a tensor shaped like parameter ``name``, computed at most once per
        ``key``) over every axis but ``dim``.

        Reduced once per tensor to a (dim0, dim1) matrix, so the filter side and the input-channel
        side of the same weight cost one pass.
        """
        cached = self._sums.get((name, key))
        if cached is None:
            with torch.no_grad():
                v = values().detach()
                v = v if v.is_floating_point() else v.float()
                if v.ndim >= 2:
                    # (dim0, dim1, rest): summing ``rest`` once leaves a small matrix whose row and column sums are the
                    # filter-side and input-side scores
                    matrix = v.reshape(v.shape[0], v.shape[1], -1)
                    matrix = matrix.sum(-1) if matrix.shape[-1] > 1 else matrix.reshape(matrix.shape[:2])
                    cached = {0: matrix.sum(1).double().cpu().numpy(), 1: matrix.sum(0).double().cpu().numpy()}
                else:
                    cached = {0: v.double().reshape(-1).cpu().numpy()}
            self._sums[(name, key)] = cached
        # a space on dim 2 or later (a parameter split into heads) is rare: reduce it on demand
        if dim not in cached:
            with torch.no_grad():
                v = values().detach().float()
                cached[dim] = v.movedim(dim, 0).reshape(v.shape[dim], -1).sum(1).double().cpu().numpy()
        return cached[dim]

    def combine(self, group: "Group", per_member: List[np.ndarray]) -> np.ndarray:
        """Aggregate per-member unit scores with ``self.reduction``."""
        if not per_member:
            return np.zeros(group.n_units)
        stacked = np.stack(per_member)
        reducers: Dict[str, Callable[..., np.ndarray]] = {"mean": stacked.mean, "sum": stacked.sum, "max": stacked.max}
        return reducers[self.reduction](axis=0)

    # ----- activations -----------------------------------------------------------------------------------
    def activations(self) -> Dict[str, InputStatistics]:
        """Per weight name, statistics of the inputs that weight reads over the calibration data (one
        streamed pass, on first use; see :mod:`structprune.scoring.activations`)."""
        if self._activations is None:
            self._activations = ActivationCollector(self.model).collect(self.data)
        return self._activations

    # ----- gradients ---------------------------------------------------------------------------------------
    def gradients(self, *kinds: str) -> Dict[str, GradientStatistics]:
        """Gradient statistics of every parameter (see :class:`GradientStatistics`) with at least ``kinds``
        collected; one pass over the data collects every kind asked for so far."""
        wanted = set(kinds or ("abs", "channel_taylor"))
        for kind in wanted:
            check_choice("gradient statistic", kind, GRADIENT_KINDS)
        if self._grads is None or not wanted <= self._grad_kinds:
            self._grad_kinds |= wanted
            self._grads = GradientCollector(self.model, self.data, self.loss_fn).collect(self._grad_kinds)
        return self._grads

    def gradient_of(self, tensor: torch.Tensor, *kinds: str) -> GradientStatistics:
        """The gradient statistics of a parameter, found by identity (a parametrized weight's original
        is reachable under a longer name than the weight)."""
        stats = self.gradients(*kinds)
        # by identity, not by name: torch.nn.utils.parametrize moves a weight to ``parametrizations.weight.original``
        for name, parameter in self.model.named_parameters():
            if parameter is tensor:
                return stats[name]
        raise InvalidOptionError("gradient scores are only defined for the model's own parameters")

