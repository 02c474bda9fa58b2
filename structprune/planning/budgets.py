"""Budgets: what fraction of the parameters or MACs a plan removes, without pruning the model.

Parameters are counted from tensor shapes; MACs come from ``torch.utils.flop_counter`` run on a
copy of the model that lives on the meta device (no memory, no arithmetic), pruned by the plan.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn

from ..graph.dependency_graph import DependencyGraph
from ..options import check_choice
from ..surgery.copying import meta_twin
from ..surgery.shrink import shrunk_copy
from ..tools.metrics import count_macs
from .planner import Plan


def params_removed(dg: DependencyGraph, model: nn.Module) -> Callable[[Plan], float]:
    """A function: plan -> fraction of the model's parameters the plan removes."""
    cuts: Dict[str, List] = {}
    for space in dg.spaces:
        cuts.setdefault(space.tensor, []).append(space)
    params = {id(p): (name, p) for name, p in model.named_parameters()}
    total = sum(p.numel() for _, p in params.values())

    def fraction(plan: Plan) -> float:
        dropped = plan.element_mask(dg)
        after = 0.0
        for name, p in params.values():
            numel = float(p.numel())
            for space in cuts.get(name, ()):
                # a tensor cut on two dims (a conv weight) keeps the product of the two kept fractions
                numel *= 1 - space.of(dropped).mean()
            after += numel
        return 1 - after / max(total, 1)

    return fraction


def macs_removed(dg: DependencyGraph, model: nn.Module) -> Callable[[Plan], float]:
    """A function: plan -> fraction of one forward pass's MACs the plan removes (FlopCounterMode)."""
    meta_model = meta_twin(model)
    to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
    inputs = dg.inputs
    example = {k: to_meta(v) for k, v in inputs.kwargs.items()} if inputs.kwargs else \
        tuple(to_meta(a) for a in inputs.args)
    total = count_macs(meta_model, example)

    def fraction(plan: Plan) -> float:
        pruned = shrunk_copy(meta_model, dg, plan.element_mask(dg))
        return 1 - count_macs(pruned, example) / max(total, 1)

    return fraction


MEASURES: Dict[str, Callable[[DependencyGraph, nn.Module], Callable[[Plan], float]]] = {
    "params": params_removed, "macs": macs_removed}


def removed_fraction(kind: str, dg: DependencyGraph, model: nn.Module) -> Callable[[Plan], float]:
    """A function: plan -> fraction of the ``kind`` budget it removes (``kind``: ``"params"`` or ``"macs"``,
    counted without running the model; latency is measured, see :mod:`structprune.planning.latency`)."""
    return MEASURES[check_choice("target", kind, tuple(MEASURES))](dg, model)
