"""Importance criteria: ``criterion(group, model) -> scores`` (one score per unit, higher = keep).

A criterion scores every member slice of the group and aggregates: each member's per-unit scores
are normalised by their mean (so a BatchNorm scale and a 3x3 filter weigh alike) and averaged.
Register new criteria with :func:`register_criterion`.
"""
from __future__ import annotations

from typing import Callable, Dict, Union

import numpy as np
import torch
from torch import nn

from .graph import Group

Criterion = Callable[[Group, nn.Module], np.ndarray]
_CRITERIA: Dict[str, Criterion] = {}


def register_criterion(name: str):
    def register(fn: Criterion) -> Criterion:
        _CRITERIA[name] = fn
        return fn

    return register


def get_criterion(criterion: Union[str, Criterion]) -> Criterion:
    if callable(criterion):
        return criterion
    try:
        return _CRITERIA[criterion]
    except KeyError:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(_CRITERIA)} "
                         "or pass a function (group, model) -> scores") from None


def tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    owner = model.get_submodule(path) if path else model
    return getattr(owner, attr)


def member_scores(group: Group, model: nn.Module, per_position: Callable[[torch.Tensor], torch.Tensor],
                  finish: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
    """Aggregate a per-position statistic over the group's trainable members.

    ``per_position`` maps a member reshaped to (positions, rest) to one value per position; the
    values of positions of one unit are summed, passed through ``finish``, mean-normalised per
    member, and averaged over members.
    """
    totals, count = np.zeros(group.n_units), 0
    for space, index in zip(group.spaces, group.unit_index):
        t = tensor_of(model, space.tensor)
        if not isinstance(t, nn.Parameter):
            continue  # running statistics are not importance signals
        rows = t.detach().movedim(space.dim, 0).reshape(t.shape[space.dim], -1).float()
        values = per_position(rows).cpu().double().numpy()
        unit = finish(np.bincount(index, weights=values, minlength=group.n_units))
        mean = unit.mean()
        totals += unit / mean if mean > 0 else unit
        count += 1
    return totals / max(count, 1)


@register_criterion("l2")
def l2_norm(group: Group, model: nn.Module) -> np.ndarray:
    """L2 norm of every unit's weights, per member, mean-normalised and averaged."""
    return member_scores(group, model, lambda rows: rows.pow(2).sum(1), np.sqrt)


@register_criterion("l1")
def l1_norm(group: Group, model: nn.Module) -> np.ndarray:
    """Sum of absolute weights of every unit, per member, mean-normalised and averaged."""
    return member_scores(group, model, lambda rows: rows.abs().sum(1))


@register_criterion("random")
def random_scores(group: Group, model: nn.Module) -> np.ndarray:
    """Uniform random scores (the pruning-at-initialisation baseline); seeded by torch's RNG."""
    return torch.rand(group.n_units, dtype=torch.float64).numpy()
