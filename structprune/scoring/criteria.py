"""Importance criteria: ``criterion(group, context) -> scores`` (one score per unit, higher = keep).

Every criterion scores each member slice of a group (a conv's filters, the BN entries, the next
layer's input columns) and the per-member scores are aggregated (``context.reduction``: mean, sum
or max). Built-in criteria, after the textbook chapter the project follows:

=============  ==================================================================================
``magnitude``  mean |w| over the unit's slice in each member (element-wise magnitude, averaged, so a
               BN scale and a 3x3 filter row weigh alike whatever their size)
``l1``         L1 norm of the unit's slice in each member
``l2``         L2 norm of the unit's slice in each member (default)
``gradient``   mean |dL/dw| over calibration batches, summed over the slice
``taylor``     first-order Taylor (Molchanov et al.): |sum over a channel's slice of w * dL/dw| per
               batch, summed over batches
``fpgm``       He et al. 2019: sum of distances from each slice to the others in its member (the
               slices closest to the geometric median are the most replaceable, so score lowest)
``bn_scale``   Network Slimming: |gamma| of the normalisation scales in the group (L2 when a group
               has none)
``random``     uniform scores from a generator seeded by ``context.seed``
=============  ==================================================================================

Register more with :func:`register_criterion`; any callable ``(group, context) -> scores`` works.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StructPruneError
from ..graph.dependency_graph import DependencyGraph, Group, named_tensors
from ..graph.capture import eval_mode

Criterion = Callable[[Group, "ScoringContext"], Any]
_CRITERIA: Dict[str, Criterion] = {}
REDUCTIONS = ("mean", "sum", "max")
NORMALIZATIONS = (None, "mean", "max", "sum")


def register_criterion(name: str):
    """Register ``fn(group, context) -> scores`` under ``name`` (usable as ``criterion=name``)."""

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
                         "or pass a function (group, context) -> scores") from None


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of ``model(inputs)`` against ``targets`` for an ``(inputs, targets)`` batch."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise StructPruneError("calibration batches must be (inputs, targets) pairs for the default "
                               "cross-entropy loss; pass loss_fn=lambda model, batch: ... for anything else")
    inputs, targets = batch
    output = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", output[0])
    return F.cross_entropy(logits, targets)


@dataclass
class ScoringContext:
    """Everything a criterion may need, with the per-tensor statistics computed once and shared.

    Attributes:
        model: the model being pruned (its tensors are read, never changed).
        graph: the :class:`DependencyGraph`.
        data: calibration batches for gradient criteria (any iterable, e.g. a DataLoader).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: :func:`default_loss`.
        reduction: how member scores combine into a unit score: ``mean``, ``sum`` or ``max``.
        seed: seed of the ``random`` criterion (and nothing else).
    """

    model: nn.Module
    graph: DependencyGraph
    data: Optional[Iterable] = None
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None
    reduction: str = "mean"
    seed: Optional[int] = None
    _tensors: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _sums: Dict[tuple, Dict[int, np.ndarray]] = field(default_factory=dict, repr=False)
    _grads: Optional[Dict[str, Dict[str, torch.Tensor]]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, not {self.reduction!r}")
        self._tensors = named_tensors(self.model)

    # ----- tensors and per-axis statistics -----------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def trainable_members(self, group: Group):
        """(space, unit index, parameter) of every trainable member (running statistics excluded)."""
        for space, index in zip(group.spaces, group.unit_index):
            t = self._tensors[space.tensor]
            if isinstance(t, nn.Parameter):
                yield space, index, t

    def axis_sums(self, name: str, values: Callable[[], torch.Tensor], key: str, dim: int) -> np.ndarray:
        """Sum of ``values()`` (a tensor shaped like parameter ``name``, computed at most once per
        ``key``) over every axis but ``dim``.

        Reduced once per tensor to a (dim0, dim1) matrix, so the filter side and the input-channel
        side of the same weight cost one pass.
        """
        cached = self._sums.get((name, key))
        if cached is None:
            with torch.no_grad():
                v = values().detach()
                v = v if v.is_floating_point() else v.float()
                if v.ndim >= 2:
                    matrix = v.reshape(v.shape[0], v.shape[1], -1)
                    matrix = matrix.sum(-1) if matrix.shape[-1] > 1 else matrix.reshape(matrix.shape[:2])
                    cached = {0: matrix.sum(1).double().cpu().numpy(), 1: matrix.sum(0).double().cpu().numpy()}
                else:
                    cached = {0: v.double().reshape(-1).cpu().numpy()}
            self._sums[(name, key)] = cached
        if dim not in cached:
            with torch.no_grad():
                v = values().detach().float()
                cached[dim] = v.movedim(dim, 0).reshape(v.shape[dim], -1).sum(1).double().cpu().numpy()
        return cached[dim]

    def combine(self, group: Group, per_member: List[np.ndarray]) -> np.ndarray:
        """Aggregate per-member unit scores with ``self.reduction``."""
        if not per_member:
            return np.zeros(group.n_units)
        stacked = np.stack(per_member)
        return {"mean": stacked.mean, "sum": stacked.sum, "max": stacked.max}[self.reduction](axis=0)

    # ----- gradients ---------------------------------------------------------------------------------------
    def gradients(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Per parameter: ``abs`` = mean |dL/dw| over batches; ``taylor`` = for dims 0 and 1, the sum over
        batches of |per-channel sum of w * dL/dw|.

        Computed once with ``torch.autograd.grad`` in eval mode: no ``.grad`` fields, hooks or
        BatchNorm statistics are left on the model. Under torch.distributed the sums are
        all-reduced, so every rank scores (and prunes) identically.
        """
        if self._grads is not None:
            return self._grads
        if self.data is None:
            raise StructPruneError("gradient-based criteria need calibration data: pass data=<batches or "
                                   "DataLoader> (and loss_fn=... unless batches are (inputs, targets) pairs)")
        loss_fn = self.loss_fn or default_loss
        params = dict(self.model.named_parameters())
        names, tensors = list(params), list(params.values())
        flags = [t.requires_grad for t in tensors]
        absolute = [torch.zeros_like(t) for t in tensors]
        taylor = [[torch.zeros(t.shape[d], dtype=torch.float64, device=t.device) for d in range(min(t.ndim, 2))]
                  for t in tensors]
        batches = 0
        try:
            for t in tensors:
                t.requires_grad_(True)
            with eval_mode(self.model), torch.enable_grad():
                for batch in self.data:
                    loss = loss_fn(self.model, batch)
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    for k, g in enumerate(grads):
                        if g is not None:
                            absolute[k] += g.abs()
                            for d, total in enumerate(taylor[k]):  # |per-channel w*g| of this batch
                                total += _channel_sums(tensors[k].detach() * g, d).abs()
                    batches += 1
        finally:
            for t, flag in zip(tensors, flags):
                t.requires_grad_(flag)
        if batches == 0:
            raise StructPruneError("the calibration data yielded no batches")
        counts = torch.tensor([float(batches)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in absolute + [t for dims in taylor for t in dims] + [counts]:
                torch.distributed.all_reduce(buffer)
        self._grads = {name: {"abs": a / counts.item(), "taylor": w} for name, a, w in zip(names, absolute, taylor)}
        return self._grads


def _channel_sums(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every axis but ``dim`` (float64)."""
    return values.movedim(dim, 0).reshape(values.shape[dim], -1).sum(1).double()


def normalize(scores: np.ndarray, how: Optional[str]) -> np.ndarray:
    """Scale a group's scores so groups of different size and magnitude compare (global scope)."""
    if how is None:
        return scores
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {how!r}")
    scale = {"mean": np.mean, "max": np.max, "sum": np.sum}[how](np.abs(scores)) if scores.size else 0.0
    return scores / scale if scale > 0 else scores


def _elementwise(group: Group, ctx: ScoringContext, fn: Callable[[torch.Tensor], torch.Tensor], key: str,
                 finish: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        values = ctx.axis_sums(space.tensor, lambda: fn(t.detach()), key, space.dim)
        per_member.append(finish(np.bincount(index, weights=values, minlength=group.n_units)))
    return ctx.combine(group, per_member)


@register_criterion("magnitude")
def magnitude(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Mean |w| over the unit's slice in each member, aggregated over members.

    Unlike ``l1`` (the slice's norm), members with long slices (conv filters) do not outweigh
    members with one weight per channel (BN scales, biases).
    """
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        values = ctx.axis_sums(space.tensor, lambda: t.detach().abs(), "abs", space.dim)
        per_position = t.numel() // t.shape[space.dim]
        sums = np.bincount(index, weights=values, minlength=group.n_units)
        counts = np.bincount(index, minlength=group.n_units) * per_position
        per_member.append(sums / np.maximum(counts, 1))
    return ctx.combine(group, per_member)


@register_criterion("l1")
def l1_norm(group: Group, ctx: ScoringContext) -> np.ndarray:
    """L1 norm of the unit's slice in each member, aggregated over members."""
    return _elementwise(group, ctx, torch.abs, "abs")


@register_criterion("l2")
def l2_norm(group: Group, ctx: ScoringContext) -> np.ndarray:
    """L2 norm of the unit's slice in each member, aggregated over members."""
    return _elementwise(group, ctx, torch.square, "square", np.sqrt)


@register_criterion("gradient")
def gradient(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Mean |dL/dw| over the calibration batches, summed over the unit's slice in each member."""
    grads = ctx.gradients()
    per_member = []
    for space, index, _ in ctx.trainable_members(group):
        values = ctx.axis_sums(space.tensor, lambda: grads[space.tensor]["abs"], "grad", space.dim)
        per_member.append(np.bincount(index, weights=values, minlength=group.n_units))
    return ctx.combine(group, per_member)


@register_criterion("taylor")
def taylor(group: Group, ctx: ScoringContext) -> np.ndarray:
    """First-order Taylor importance: per batch |sum over the channel's slice of w * dL/dw|, summed
    over batches (taking the magnitude per batch keeps opposite-signed batches from cancelling)."""
    grads = ctx.gradients()
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        per_dim = grads[space.tensor]["taylor"]
        if space.dim < len(per_dim):
            values = per_dim[space.dim].cpu().numpy()
        else:  # an axis beyond the first two (rare): fall back to the summed-then-absolute form
            values = np.abs(_channel_sums(t.detach() * grads[space.tensor]["abs"], space.dim).cpu().numpy())
        per_member.append(np.bincount(index, weights=values, minlength=group.n_units))
    return ctx.combine(group, per_member)


@register_criterion("fpgm")
def fpgm(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Filter pruning via geometric median (He et al. 2019).

    In each member, a slice's score is the sum of its Euclidean distances to the member's other
    slices: the slices nearest the geometric median are the easiest to replace and score lowest.
    """
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        rows = t.detach().movedim(space.dim, 0).reshape(t.shape[space.dim], -1).float()
        distances = torch.cdist(rows, rows).sum(1).double().cpu().numpy()
        per_member.append(np.bincount(index, weights=distances, minlength=group.n_units))
    return ctx.combine(group, per_member)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@register_criterion("bn_scale")
def bn_scale(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Network Slimming (Liu et al. 2017): |gamma| of the group's normalisation scales.

    Groups without a normalisation scale fall back to :func:`l2_norm`.
    """
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        path, _, attr = space.tensor.rpartition(".")
        owner = ctx.model.get_submodule(path) if path else ctx.model
        if attr == "weight" and isinstance(owner, _NORMS):
            values = t.detach().abs().double().reshape(-1).cpu().numpy()
            per_member.append(np.bincount(index, weights=values, minlength=group.n_units))
    return ctx.combine(group, per_member) if per_member else l2_norm(group, ctx)


@register_criterion("random")
def random_scores(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Uniform random scores (the pruning-at-initialisation baseline), reproducible with ``seed``."""
    seed = ctx.seed if ctx.seed is not None else 0
    return np.random.default_rng([seed, group.id]).random(group.n_units)
