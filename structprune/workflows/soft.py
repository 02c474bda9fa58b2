"""Soft filter pruning (He et al. 2018): prune during training, let pruned filters regrow.

:class:`SoftPruner` zeroes the least important channels at every update but leaves them in the
model, so training can make them important again; each update re-selects. After the last update
:meth:`SoftPruner.finalize` removes the channels that are zero, and the result computes exactly what
the masked model computed (checked by the one verifier).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..graph.dependency_graph import DependencyGraph
from ..graph.labels import Space
from ..options import Options
from ..pipeline import PruningSession
from ..planning.planner import Plan


def zero_channels(model: nn.Module, graph: DependencyGraph, dropped: np.ndarray, filters_only: bool = False) -> None:
    """Zero, in place, the slices of the dropped channels: in every member tensor, or with
    ``filters_only`` only in the layers that produce them (a conv's filters and bias), so that
    gradients still reach them through the layers that follow (soft pruning's regrowth)."""
    spaces: Sequence[Space] = graph.spaces
    if filters_only:
        producer = graph.producer_mask()
        # keyed by (module, dim): a producing conv's bias (same module, dim 0) is zeroed with its filters,
        # while the layers that read those channels are left alone
        owners = {(s.tensor.rpartition(".")[0], s.dim) for s in spaces if producer[s.start:s.start + s.size].any()}
        spaces = [s for s in spaces if (s.tensor.rpartition(".")[0], s.dim) in owners]
    with torch.no_grad():
        for space in spaces:
            gone = np.flatnonzero(space.of(dropped))
            if gone.size:
                tensor = graph.tensors[space.tensor]
                tensor.index_fill_(space.dim, torch.as_tensor(gone, device=tensor.device), 0)


class SoftPruner:
    """Soft filter pruning: zero the least important ``ratio`` of filters, let them regrow, repeat.

    ``model`` is trained in place; call :meth:`update` after every epoch (it re-scores the current
    weights, re-selects and zeroes the chosen channels' filters; the layers after them are left
    alone, so gradients still reach the zeroed filters), then :meth:`finalize` for the physically
    smaller model.
    Options are those of :func:`structprune.slim` (``criterion``, ``data``, ``scope``, ``ignore``, ``ratios``,
    ``round_to``, ``hidden``, ``tracer``, ``attention``...); ``verify`` (default True) checks the result
    of :meth:`finalize` and makes every :meth:`update` dry-run its selection on the meta device, so a
    group whose removal would break the forward is never masked in the first place.
    """

    def __init__(self, model: nn.Module, example_input: Any, ratio: float = 0.5, **options: Any):
        allowed = [name for name in Options.names() if name != "inplace"]  # finalize returns a smaller copy
        self.session = PruningSession(model, example_input,
                                      Options.parse({"ratio": ratio, **options}, allowed=allowed, caller="SoftPruner"))
        self.model = model
        self.graph = self.session.graph
        self.plan: Plan = Plan()
        self.dropped = np.zeros(self.graph.n_elements, bool)
        self.update()

    def update(self) -> Plan:
        """Re-score the current weights, choose the channels to mask, and zero them."""
        self.session.planner(rescore=True)
        self.plan = self.session.plan()
        self.dropped = self.plan.element_mask(self.graph)
        zero_channels(self.model, self.graph, self.dropped, filters_only=True)
        return self.plan

    @property
    def masked_fraction(self) -> float:
        """Fraction of the prunable channels currently masked."""
        prunable = sum(g.n_units - int(g.frozen_units.sum()) for g in self.graph.prunable_groups)
        return self.plan.n_dropped / max(prunable, 1)

    def finalize(self) -> nn.Module:
        """The model without the channels of the last :meth:`update`. Those channels are first zeroed
        in every member (the next layers' inputs and the norms too, not only the filters), so the
        masked ``model`` and the returned smaller copy compute exactly the same function (verified
        unless ``verify=False``; if that fails, ``model`` gets its values back before the error is raised)."""
        touched = {space.tensor for space in self.graph.spaces if space.of(self.dropped).any()}
        saved = {name: self.graph.tensors[name].detach().clone() for name in touched}
        zero_channels(self.model, self.graph, self.dropped)
        try:
            return self.session.apply(self.plan)[0]
        except BaseException:
            with torch.no_grad():
                for name, values in saved.items():
                    self.graph.tensors[name].copy_(values)
            raise
