"""Sparsity regularisers: add to the task loss so training drives whole channels towards zero.

* ``"bn_l1"`` (Network Slimming, Liu et al. 2017): L1 of every BatchNorm/InstanceNorm scale, so
  channels whose scale shrinks can then be pruned with ``criterion="bn_scale"``.
* ``"group_lasso"``: the sum over the channels of every prunable coupled group of the L2 norm of
  everything the channel owns (its filter, its BN entries, the next layer's input columns, every
  member of the group), so a channel is pushed to zero as one unit. Needs ``example_input`` to find
  the groups; they are found once per model and remembered.

    loss = task_loss + sp.regularizer(model, "bn_l1", 1e-4)
    loss = task_loss + sp.regularizer(model, "group_lasso", 1e-4, example_input=x)
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..graph.dependency_graph import DependencyGraph

KINDS = ("bn_l1", "group_lasso")
# model -> (ids of its parameters when the groups were found, the per-group terms)
_GROUP_TERMS: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, List[Tuple]]]" = weakref.WeakKeyDictionary()


def regularizer(model: nn.Module, kind: str, strength: float, *, example_input: Any = None) -> torch.Tensor:
    """``strength`` times the ``kind`` sparsity penalty of ``model`` (a differentiable scalar)."""
    if kind == "bn_l1":
        return strength * bn_l1(model)
    if kind == "group_lasso":
        return strength * group_lasso(model, example_input)
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def bn_l1(model: nn.Module) -> torch.Tensor:
    """Sum of |gamma| over the affine scales of every batch or instance norm."""
    scales = [m.weight for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._NormBase) and m.weight is not None]
    if not scales:
        raise ValueError("bn_l1 needs BatchNorm/InstanceNorm layers with affine scales; the model has none")
    return sum(w.abs().sum() for w in scales)


def group_lasso(model: nn.Module, example_input: Optional[Any] = None) -> torch.Tensor:
    """Sum over the prunable channels of every group of the L2 norm of the channel's slices."""
    identity = tuple(id(p) for p in model.parameters())
    cached = _GROUP_TERMS.get(model)
    if cached is None or cached[0] != identity:  # first call, or the model was pruned in place since
        if example_input is None:
            raise ValueError("group_lasso needs example_input=... to find the coupled groups of this model "
                             "(again, if its parameters changed since the last call)")
        cached = _GROUP_TERMS[model] = (identity, _group_terms(model, example_input))
    terms = cached[1]
    total = None
    for tensors, n_units, free in terms:
        squares = None
        for tensor, dim, index in tensors:
            per_index = tensor.pow(2).sum(dim=[d for d in range(tensor.ndim) if d != dim]) if tensor.ndim > 1 \
                else tensor.pow(2)
            part = torch.zeros(n_units, dtype=per_index.dtype, device=per_index.device).index_add(0, index, per_index)
            squares = part if squares is None else squares + part
        norms = squares[free].clamp_min(1e-24).sqrt()  # clamp: a finite gradient for an all-zero channel
        total = norms.sum() if total is None else total + norms.sum()
    if total is None:
        raise ValueError("group_lasso found no prunable channel group in the model")
    return total


def _group_terms(model: nn.Module, example_input: Any) -> List[Tuple]:
    graph = DependencyGraph(model, example_input)
    params: Dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    terms = []
    for group in graph.prunable_groups:
        tensors = []
        for space, index in zip(group.spaces, group.unit_index):
            tensor = params.get(space.tensor)
            if tensor is not None and tensor.requires_grad:  # buffers (running stats) are not trained
                tensors.append((tensor, space.dim, torch.as_tensor(index, device=tensor.device)))
        if tensors:
            free = torch.as_tensor(~group.frozen_units, device=tensors[0][0].device)
            terms.append((tensors, group.n_units, free))
    return terms
