"""Sparsity regularisers: add to the task loss so training drives whole channels towards zero.

* ``"bn_l1"`` (Network Slimming, Liu et al. 2017): L1 of every BatchNorm/InstanceNorm scale, so
  channels whose scale shrinks can then be pruned with ``criterion="bn_scale"``.
* ``"group_lasso"``: the sum over the channels of every prunable coupled group of the L2 norm of
  everything the channel owns (its filter, its BN entries, the next layer's input columns, every
  member of the group), so a channel is pushed to zero as one unit. Needs ``example_input`` to find
  the groups; they are found once per model and remembered. With ``criterion`` and ``ratio`` it is
  *targeted*: only the channels the criterion ranks lowest (those ``slim`` with these options would
  remove) are penalised, so training frees exactly what will be pruned and leaves the rest alone.
  Every option of :func:`~structprune.slim` (``tracer``, ``attention``, ``ignore``, ``hidden``,
  ``scope``...) means the same here: the groups and the plan come from the same pruning session.

    loss = task_loss + sp.regularizer(model, "bn_l1", 1e-4)
    loss = task_loss + sp.regularizer(model, "group_lasso", 1e-4, example_input=x)
    loss = task_loss + sp.regularizer(model, "group_lasso", 1e-4, example_input=x, criterion="l2", ratio=0.5)
"""
from __future__ import annotations

import numbers
import weakref
from typing import Any, Dict, List, Optional, Tuple, cast

import numpy as np
import torch
from torch import nn

from ..errors import InvalidOptionError
from ..options import Options, as_scalar, check_choice, require_module
from ..pipeline import PruningSession

KINDS = ("bn_l1", "group_lasso")
TARGETING = ("criterion", "ratio", "ratios", "target")  # options that make group lasso target a plan
# model -> (ids of its parameters when the groups were found, the per-group terms)
_GROUP_TERMS: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, List[Tuple]]]" = weakref.WeakKeyDictionary()


def regularizer(model: nn.Module, kind: str, strength: float, *, example_input: Any = None,
                **options: Any) -> torch.Tensor:
    """``strength`` times the ``kind`` sparsity penalty of ``model`` (a differentiable scalar).

    ``options`` (group lasso only) are those of :func:`~structprune.slim`: ``ignore``, ``hidden`` and the
    trace options choose the channels that may be penalised; with ``criterion``, ``ratio``, ``ratios`` or
    ``target`` the penalty targets only the channels such a plan would prune."""
    require_module(model)
    check_choice("kind", kind, KINDS)
    value = as_scalar(strength)  # a 0-d tensor (a scheduled strength) multiplies like a number
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
        raise InvalidOptionError(f"strength must be a non-negative number, got {strength!r}; pass e.g. 1e-4")
    if kind == "bn_l1":
        if options or example_input is not None:
            raise InvalidOptionError("bn_l1 takes no example_input or pruning options; they belong to group_lasso")
        return strength * bn_l1(model)
    return strength * group_lasso(model, example_input, **options)


def bn_l1(model: nn.Module) -> torch.Tensor:
    """Sum of |gamma| over the affine scales of every batch or instance norm."""
    scales = [m.weight for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._NormBase) and m.weight is not None]
    if not scales:
        raise InvalidOptionError("bn_l1 needs BatchNorm/InstanceNorm layers with affine scales; the model has none: "
                                 "use kind='group_lasso'")
    return cast(torch.Tensor, sum(w.abs().sum() for w in scales))  # a tensor: ``scales`` is not empty


def group_lasso(model: nn.Module, example_input: Optional[Any] = None, **options: Any) -> torch.Tensor:
    """Sum over the prunable channels of every group of the L2 norm of the channel's slices (only over
    the channels ``criterion`` would prune, when ``options`` name one)."""
    # the groups are cached per model (called every training step); new parameter objects mean the model was
    # pruned in place since, and options are part of the key because they change which units are penalised
    identity = (tuple(id(p) for p in model.parameters()), _option_key(options))
    cached = _GROUP_TERMS.get(model)
    if cached is None or cached[0] != identity:  # first call, or the model was pruned in place since
        if example_input is None:
            raise InvalidOptionError("group_lasso needs example_input=... to find the coupled groups of this model "
                                     "(again, if its parameters changed since the last call)")
        cached = _GROUP_TERMS[model] = (identity, _group_terms(model, example_input, options))
    terms = cached[1]
    total = None
    for tensors, n_units, free in terms:
        squares = None
        for tensor, dim, index in tensors:
            per_index = tensor.pow(2).sum(dim=[d for d in range(tensor.ndim) if d != dim]) if tensor.ndim > 1 \
                else tensor.pow(2)
            # index_add sums every slice of a unit (a grouped conv's tied positions) into that unit's squared norm
            part = torch.zeros(n_units, dtype=per_index.dtype, device=per_index.device).index_add(0, index, per_index)
            squares = part if squares is None else squares + part
        assert squares is not None  # _group_terms keeps only groups with at least one tensor
        norms = squares[free].clamp_min(1e-24).sqrt()  # clamp: a finite gradient for an all-zero channel
        total = norms.sum() if total is None else total + norms.sum()
    if total is None:
        raise InvalidOptionError("group_lasso found no prunable channel group in the model; use kind='bn_l1' or "
                                 "check sp.DependencyGraph(model, x).summary() for why channels are frozen")
    return total


def _option_key(value: Any) -> Any:
    """A comparable stand-in for option values: plain values and containers by value (a list written
    inline in the training loop is the same option every step), other objects (modules, data, functions)
    by identity."""
    if isinstance(value, (int, float, str, bool, type(None), type)):
        return value
    if isinstance(value, dict):
        return tuple(sorted((str(k), _option_key(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_option_key(v) for v in value)
    return ("id", id(value))


def _group_terms(model: nn.Module, example_input: Any, options: Dict[str, Any]) -> List[Tuple]:
    allowed = [name for name in Options.names() if name not in ("verify", "inplace", "reference_widths")]
    parsed = Options.parse(options, allowed=allowed, caller="regularizer")
    session = PruningSession(model, example_input, parsed)
    if any(name in options for name in TARGETING):  # only the units such a plan would remove
        penalised_units = session.plan(dry_run=True).drops
    else:  # every unit a plan may remove: frozen, ignored and (hidden=False) normalised widths stay free
        penalised_units = session.planner().candidates(parsed.plan)
    params: Dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    terms = []
    for group in session.graph.prunable_groups:
        tensors = []
        for space, index in zip(group.spaces, group.unit_index):
            tensor = params.get(space.tensor)
            if tensor is not None and tensor.requires_grad:  # buffers (running stats) are not trained
                tensors.append((tensor, space.dim, torch.as_tensor(index, device=tensor.device)))
        penalised = np.zeros(group.n_units, bool)
        penalised[penalised_units.get(group.id, np.empty(0, np.int64))] = True
        if tensors and penalised.any():
            terms.append((tensors, group.n_units, torch.as_tensor(penalised, device=tensors[0][0].device)))
    return terms
