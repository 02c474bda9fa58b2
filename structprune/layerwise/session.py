"""Scoring and planning a model whose weights stay in the checkpoint.

:class:`StreamedSession` is the ordinary :class:`~structprune.pipeline.PruningSession` (same graph,
same planner, same budgets, same dry run) with one difference: the criterion reads weights through
:class:`CheckpointTensors`, which reads each from the checkpoint when it is asked for, and activation
statistics come from the layer loop instead of a whole-model forward. Criteria reduce each weight
to a few numbers per channel once (``ScoringContext.axis_sums``), so a weight is held only while it
is reduced.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..errors import InvalidOptionError
from ..options import Options
from ..pipeline import PruningSession
from ..planning.patterns import check_rules_match
from ..scoring import ScoringContext
from ..scoring.activations import InputStatistics
from ..surgery.compensation import Compensation, config_can_hold_bias
from .skeleton import Materializer

CACHE_BYTES = 256 * 2 ** 20  # a group reads each of its tensors once; the cache only spares re-reads nearby
logger = logging.getLogger("structprune")


class CheckpointTensors(Mapping):
    """Name -> tensor for every name of the skeleton, values read from the checkpoint on access (a few
    recent ones cached, up to ``cache_bytes``); tensors that are real in the skeleton (computed buffers)
    are returned as they are."""

    def __init__(self, materializer: Materializer, cache_bytes: int = CACHE_BYTES):
        self.materializer, self.cache_bytes = materializer, cache_bytes
        self._cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._bytes = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        canonical = self.materializer.canonical[name]
        original = self.materializer.originals[canonical]
        if not original.is_meta or canonical not in self.materializer.stored:
            return original
        if canonical in self._cache:
            self._cache.move_to_end(canonical)
            return self._cache[canonical]
        value = self.materializer.checkpoint.read([self.materializer.stored[canonical]])[
            self.materializer.stored[canonical]]
        tensor = nn.Parameter(value, requires_grad=False) if isinstance(original, nn.Parameter) else value
        self._cache[canonical] = tensor
        self._bytes += value.numel() * value.element_size()
        while self._bytes > self.cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.materializer.canonical)

    def __len__(self) -> int:
        return len(self.materializer.canonical)


@dataclass
class StreamedScoringContext(ScoringContext):
    """A :class:`ScoringContext` reading weights from the checkpoint and statistics from the layer loop."""

    materializer: Optional[Materializer] = None
    statistics: Dict[str, InputStatistics] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        assert self.materializer is not None
        self._tensors = CheckpointTensors(self.materializer)  # type: ignore[assignment]
        self._activations = self.statistics

    def gradients(self, *kinds: str) -> Any:
        raise InvalidOptionError("gradient criteria ('taylor', 'gradient') need a backward pass through the whole "
                                 "model, which layer-by-layer pruning never holds; use 'flap' or 'wanda' (activation-"
                                 "aware) or a weight criterion ('l2', 'l1', 'fpgm'), or load the model and call slim")


def _class_and_child(model: nn.Module, path: str) -> str:
    """``LlamaMLP.down_proj`` for ``model.layers.0.mlp.down_proj``: how a layer reads in a message."""
    parent, _, child = path.rpartition(".")
    return f"{type(model.get_submodule(parent)).__name__}.{child}"


class StreamedSession(PruningSession):
    """A pruning session over a ``meta`` skeleton whose weights ``materializer`` reads, with the calibration
    ``statistics`` collected layer by layer; ``device``/``dtype``: where and in what the pruned model will
    compute (what ``round_to="auto"`` rounds widths for); ``reloadable_only``: compensate only the layers whose
    bias the saved config can describe."""

    def __init__(self, model: nn.Module, example_input: Any, options: Options, materializer: Materializer,
                 statistics: Dict[str, InputStatistics], device: torch.device, dtype: torch.dtype,
                 reloadable_only: bool = False):
        self.materializer, self.statistics = materializer, statistics
        self.reloadable_only = reloadable_only
        self.device, self.dtype = device, dtype
        super().__init__(model, example_input, options)

    def _check_before_tracing(self, example_input: Any) -> None:
        plan = self.options.plan
        check_rules_match(self.model, plan.ignore, plan.ratios)  # the example is on meta: no samples to check

    def _check_materialised(self) -> None:
        """The weights are read from the checkpoint when scored."""

    def _scoring_context(self) -> ScoringContext:
        score = self.options.score
        return StreamedScoringContext(self.model, self.graph, data=None, reduction=score.reduction, seed=score.seed,
                                      materializer=self.materializer, statistics=self.statistics)

    def compensation(self, dropped: Optional[np.ndarray] = None) -> Optional[Compensation]:
        """The calibration means of the removed inputs (None: ``compensate=False`` or no calibration data; the
        constant-channel search of in-memory pruning needs the whole model run). With ``reloadable_only``, only
        for the layers whose bias the saved config can describe; ``dropped`` (the plan's element mask) names
        the layers left out in a note and a warning."""
        if not self.options.prune.compensate or not self.statistics:
            return None
        full = Compensation.from_statistics(self.graph, self.statistics)
        if not self.reloadable_only:
            return full
        keep = [name for name in full.means if all(config_can_hold_bias(self.model, p) for p in full.owners[name])]
        losing = set(full.constants(self.graph, dropped)) if dropped is not None else set()
        skipped = sorted({_class_and_child(self.model, path) for name in losing - set(keep)
                          for path in full.owners[name]})
        if skipped:
            note = (f"bias compensation skipped the layers whose config has no bias flag ({', '.join(skipped)}): "
                    f"from_pretrained could not rebuild their biases. Pass compensate=True to be refused instead")
            if note not in self.graph.notes:
                self.graph.notes.append(note)
                logger.warning(note)
        return Compensation({n: full.means[n] for n in keep}, {n: full.statistics[n] for n in keep},
                            {n: full.readers[n] for n in keep}, {n: full.owners[n] for n in keep})

    def planner(self, rescore: bool = False):
        planner = super().planner(rescore)
        planner.device, planner.dtype = self.device, self.dtype  # widths are rounded for where the model will run
        return planner


__all__ = ["CheckpointTensors", "StreamedScoringContext", "StreamedSession"]
