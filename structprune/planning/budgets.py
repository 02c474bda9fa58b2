"""Budgets: what fraction of the parameters or MACs a plan removes, without pruning the model.

Parameters are counted from tensor shapes; MACs come from ``torch.utils.flop_counter`` run on a
copy of the model that lives on the meta device (no memory, no arithmetic), pruned by the plan.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
from torch import nn

from ..surgery.copying import deep_copy_module
from ..graph.dependency_graph import DependencyGraph
from ..tools.metrics import count_macs
from .planner import Plan
from ..surgery.shrink import shrunk_copy

TARGETS = ("params", "macs")


def params_removed(dg: DependencyGraph, model: nn.Module) -> Callable[[Plan], float]:
    """A function: plan -> fraction of the model's parameters the plan removes."""
    cuts: Dict[str, List] = {}
    for (name, dim), space in dg.state.axis_spaces.items():
        cuts.setdefault(name, []).append(space)
    params = {id(p): (name, p) for name, p in model.named_parameters()}
    total = sum(p.numel() for _, p in params.values())

    def fraction(plan: Plan) -> float:
        dropped = plan.element_mask(dg)
        after = 0
        for name, p in params.values():
            numel = float(p.numel())
            for space in cuts.get(name, ()):
                numel *= 1 - space.of(dropped).mean()
            after += numel
        return 1 - after / max(total, 1)

    return fraction


def macs_removed(dg: DependencyGraph, model: nn.Module) -> Callable[[Plan], float]:
    """A function: plan -> fraction of one forward pass's MACs the plan removes (FlopCounterMode)."""
    memo: Dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    meta_model = deep_copy_module(model, memo)
    to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
    inputs = dg.inputs
    example = {k: to_meta(v) for k, v in inputs.kwargs.items()} if inputs.kwargs else \
        tuple(to_meta(a) for a in inputs.args)
    total = count_macs(meta_model, example)

    def fraction(plan: Plan) -> float:
        pruned = shrunk_copy(meta_model, dg, plan.element_mask(dg))
        return 1 - count_macs(pruned, example) / max(total, 1)

    return fraction


def removed_fraction(kind: str, dg: DependencyGraph, model: nn.Module) -> Callable[[Plan], float]:
    if kind == "params":
        return params_removed(dg, model)
    if kind == "macs":
        return macs_removed(dg, model)
    raise ValueError(f"target must name one of {TARGETS}, not {kind!r}")


__all__ = ["TARGETS", "macs_removed", "params_removed", "removed_fraction"]
