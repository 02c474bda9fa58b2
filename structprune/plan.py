"""Planning: which units every group drops, given a ratio and an importance criterion."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict

import numpy as np
from torch import nn

from .criteria import Criterion, clear_cache
from .graph import DependencyGraph, Group


@dataclass
class Plan:
    """Dropped unit indices per group id, and the resulting per-element drop mask."""

    drops: Dict[int, np.ndarray] = field(default_factory=dict)

    def element_mask(self, dg: DependencyGraph) -> np.ndarray:
        """Boolean per channel element: True where the element is removed."""
        dropped_root = np.zeros(dg.state.n_elements, bool)
        for gid, units in self.drops.items():
            dropped_root[dg.groups[gid].unit_roots[units]] = True
        return dropped_root[dg.unit_root]

    @property
    def n_dropped(self) -> int:
        return int(sum(len(u) for u in self.drops.values()))


def _keep_every_space_alive(group: Group, drop: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Un-drop the best unit of any member space that would otherwise lose every channel."""
    dropped = np.zeros(group.n_units, bool)
    dropped[drop] = True
    for index in group.unit_index:
        if dropped[index].all():
            present = np.unique(index)
            dropped[present[np.argmax(scores[present])]] = False
    return np.flatnonzero(dropped)


def plan_uniform(dg: DependencyGraph, model: nn.Module, ratio: float, criterion: Criterion) -> Plan:
    """Drop ``floor(ratio * prunable units)`` of the lowest-scoring units of every layer (local scope).

    Within a group, units are counted per producing layer (a concatenation joins several layers in
    one group; each of them loses ``ratio`` of its own channels). Frozen units (coupled to a model
    output, an unknown op, a constant shape) are kept and do not count towards the ratio.
    """
    plan = Plan()
    clear_cache()
    try:
        for group in dg.prunable_groups:
            candidates = np.flatnonzero(~group.frozen_units)
            if math.floor(ratio * len(candidates) + 1e-9) <= 0:
                continue
            scores = np.asarray(criterion(group, model), dtype=np.float64)
            if scores.shape != (group.n_units,):
                raise ValueError(f"criterion returned shape {scores.shape} for group {group.id} with "
                                 f"{group.n_units} units")
            chosen = []
            for origin in np.unique(group.unit_origin[candidates]):
                layer = candidates[group.unit_origin[candidates] == origin]
                n_drop = math.floor(ratio * len(layer) + 1e-9)
                chosen.append(layer[np.argsort(scores[layer], kind="stable")[:n_drop]])
            drop = np.concatenate(chosen)
            if len(drop) >= group.n_units:
                drop = drop[np.argsort(scores[drop], kind="stable")[:group.n_units - 1]]
            drop = _keep_every_space_alive(group, drop, scores)
            if drop.size:
                plan.drops[group.id] = drop
    finally:
        clear_cache()  # the cache holds references to the model's tensors
    return plan
