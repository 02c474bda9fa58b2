"""When to prune: during training (soft filter pruning) and before it (lottery tickets).

:class:`SoftPruner` (He et al. 2018) zeroes the least important channels at every update but leaves
them in the model, so training can make them important again; each update re-selects. After the
last update :meth:`SoftPruner.finalize` removes the channels that are zero, and the result computes
exactly what the masked model computed.

:class:`LotteryTicket` (Frankle & Carbin 2019) remembers the weights at initialisation (or at an
early iteration: :meth:`LotteryTicket.snapshot`), and after training prunes by magnitude and
rewinds the survivors to those remembered values, channel-wise (a smaller dense model) or
element-wise (masks that stay applied while retraining).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..slim import _check_ratio, slim_with_report
from ..surgery.copying import deep_copy_module
from ..scoring.criteria import Criterion, ScoringContext, get_criterion
from ..graph.dependency_graph import DependencyGraph
from ..planning.planner import Plan, PlanOptions, Planner
from ..surgery.shrink import shrunk_copy


def zero_channels(model: nn.Module, graph: DependencyGraph, dropped: np.ndarray, filters_only: bool = False) -> None:
    """Zero, in place, the slices of the dropped channels: in every member tensor, or with
    ``filters_only`` only in the layers that produce them (a conv's filters and bias), so that
    gradients still reach them through the layers that follow (soft pruning's regrowth)."""
    spaces = graph.state.spaces
    if filters_only:
        producer = np.zeros(graph.state.n_elements, bool)
        for elements in graph.state.producers:
            producer[elements] = True
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
    Planning options (``scope``, ``ignore``, ``ratios``, ``round_to``, ``hidden``) are those of
    :func:`structprune.slim`; gradient criteria take ``data`` and ``loss_fn``.
    """

    def __init__(self, model: nn.Module, example_input: Any, ratio: float = 0.5, *,
                 criterion: Union[str, Criterion] = "l2", data: Optional[Iterable] = None, loss_fn=None,
                 ignore=(), **plan_options):
        self.model = model
        self.graph = DependencyGraph(model, example_input)
        self.options = PlanOptions(_check_ratio(ratio), **plan_options)
        self.criterion = get_criterion(criterion)
        self.data, self.loss_fn, self.ignore = data, loss_fn, ignore
        self.plan: Plan = Plan()
        self.dropped = np.zeros(self.graph.state.n_elements, bool)
        self.update()

    def update(self) -> Plan:
        """Re-score the current weights, choose the channels to mask, and zero them."""
        context = ScoringContext(self.model, self.graph, data=self.data, loss_fn=self.loss_fn)
        self.plan = Planner(self.graph, context, self.criterion, self.ignore).plan(self.options)
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
        masked ``model`` and the returned smaller copy compute exactly the same function."""
        zero_channels(self.model, self.graph, self.dropped)
        return shrunk_copy(self.model, self.graph, self.dropped, self.graph.notes)


class LotteryTicket:
    """Remember ``model``'s weights now; after training, prune by magnitude and rewind the survivors.

    >>> ticket = LotteryTicket(model, x)      # at initialisation
    >>> train(ticket.model)
    >>> small = ticket.prune_and_rewind(0.5)  # survivors back to their initial values; retrain it
    """

    def __init__(self, model: nn.Module, example_input: Any):
        self.model = model
        self.example_input = example_input
        self.snapshot()

    def snapshot(self) -> None:
        """Remember the current weights as the rewind point (call at iteration k for late rewinding)."""
        self.rewind_state: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def rewound_copy(self) -> nn.Module:
        """A copy of the model holding the remembered weights."""
        twin = deep_copy_module(self.model)
        twin.load_state_dict(self.rewind_state)
        return twin

    def prune_and_rewind(self, ratio: float, *, granularity: str = "channel", criterion: Union[str, Criterion] = "l1",
                         **slim_options) -> nn.Module:
        """Prune the trained model and return the winning ticket with its remembered weights.

        ``granularity="channel"``: the channels :func:`structprune.slim` drops (by ``criterion``)
        are removed from a rewound copy: a smaller dense model. ``"element"``: the ``ratio`` of
        smallest-magnitude weights of every conv and linear layer (ranked globally) are masked in a
        rewound copy with ``torch.nn.utils.prune`` masks, which keep them at zero while retraining.
        """
        ratio = _check_ratio(ratio)
        if granularity == "channel":
            _, report = slim_with_report(self.model, self.example_input, ratio, criterion=criterion, verify=False,
                                         **slim_options)
            dropped = report.plan.element_mask(report.graph)
            return shrunk_copy(self.rewound_copy(), report.graph, dropped, report.graph.notes)
        if granularity == "element":
            return self._element_ticket(ratio)
        raise ValueError(f"granularity must be 'channel' or 'element', not {granularity!r}")

    def _element_ticket(self, ratio: float) -> nn.Module:
        twin = self.rewound_copy()
        layers = [(name, m) for name, m in self.model.named_modules()
                  if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight is not None]
        magnitudes = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
        n_drop = int(ratio * magnitudes.numel())
        threshold = magnitudes.kthvalue(n_drop).values if n_drop else magnitudes.new_tensor(-1.0)
        for name, m in layers:
            mask = (m.weight.detach().abs() > threshold).to(m.weight.dtype)
            torch_prune.custom_from_mask(twin.get_submodule(name), "weight", mask)
        return twin
