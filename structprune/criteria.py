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

from .graph import Group, named_tensors

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


_TENSORS: Dict[int, Dict[str, torch.Tensor]] = {}


def tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer called ``name`` (a lookup table is kept until :func:`clear_cache`)."""
    table = _TENSORS.get(id(model))
    if table is None:
        table = _TENSORS[id(model)] = named_tensors(model)
    return table[name]


_AXIS_SUMS: Dict[tuple, Dict[int, np.ndarray]] = {}


def clear_cache() -> None:
    """Forget cached per-axis statistics (planning calls this before scoring)."""
    _AXIS_SUMS.clear()
    _TENSORS.clear()


def axis_sums(name: str, t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], key: str, dim: int) -> np.ndarray:
    """Sum of ``fn(t)`` over every axis but ``dim``.

    ``fn(t)`` is computed once per tensor and reduced to a (dim0, dim1) matrix, from which both the
    producer side (filters) and the consumer side (input channels) are read without another pass.
    """
    cached = _AXIS_SUMS.get((name, key, t.data_ptr(), t._version))
    if cached is None:
        with torch.no_grad():
            values = fn(t.detach() if t.is_floating_point() else t.detach().float())
            if values.ndim >= 2:
                matrix = values.reshape(values.shape[0], values.shape[1], -1)
                matrix = matrix.sum(-1) if matrix.shape[-1] > 1 else matrix.reshape(matrix.shape[:2])
                cached = {0: matrix.sum(1).double().cpu().numpy(), 1: matrix.sum(0).double().cpu().numpy()}
            else:
                cached = {0: values.double().reshape(-1).cpu().numpy()} if values.ndim == 1 else {}
        _AXIS_SUMS[(name, key, t.data_ptr(), t._version)] = cached
    if dim not in cached:
        with torch.no_grad():
            values = fn(t.detach().float())
            cached[dim] = values.movedim(dim, 0).reshape(values.shape[dim], -1).sum(1).double().cpu().numpy()
    return cached[dim]


def member_scores(group: Group, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], key: str,
                  finish: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
    """Aggregate an elementwise statistic over the group's trainable members.

    ``fn`` maps weights to a non-negative statistic (``|w|``, ``w**2``); it is summed over every
    position of a unit within a member, passed through ``finish``, normalised by the member's mean
    (so a BatchNorm scale and a 3x3 filter weigh alike), and averaged over members.
    """
    totals, count = np.zeros(group.n_units), 0
    for space, index in zip(group.spaces, group.unit_index):
        t = tensor_of(model, space.tensor)
        if not isinstance(t, nn.Parameter):
            continue  # running statistics are not importance signals
        values = axis_sums(space.tensor, t, fn, key, space.dim)
        unit = finish(np.bincount(index, weights=values, minlength=group.n_units))
        mean = unit.mean()
        totals += unit / mean if mean > 0 else unit
        count += 1
    return totals / max(count, 1)


@register_criterion("l2")
def l2_norm(group: Group, model: nn.Module) -> np.ndarray:
    """L2 norm of every unit's weights, per member, mean-normalised and averaged."""
    return member_scores(group, model, torch.square, "square", np.sqrt)


@register_criterion("l1")
def l1_norm(group: Group, model: nn.Module) -> np.ndarray:
    """Sum of absolute weights of every unit, per member, mean-normalised and averaged."""
    return member_scores(group, model, torch.abs, "abs")


@register_criterion("random")
def random_scores(group: Group, model: nn.Module) -> np.ndarray:
    """Uniform random scores (the pruning-at-initialisation baseline); seeded by torch's RNG."""
    return torch.rand(group.n_units, dtype=torch.float64).numpy()
