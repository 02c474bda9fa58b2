"""Broadcasting copies: expand/broadcast_to, expand_as, repeat/tile, repeat_interleave, roll, and
``x.new_*`` factories. Copies of one channel carry its label; sizes are bound like a view's."""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from ..graph.labels import AxisLabel
from .context import RuleContext, norm_dim
from .registry import rule
from .sizes import bind_sizes, shape_args


@rule(".expand", "aten.expand", ".broadcast_to", torch.broadcast_to)
def expand(ctx: RuleContext, node):
    x = ctx.arg(0)
    label, out = ctx.tlabel(x), ctx.out
    lead = out.ndim - len(label)
    result: List[AxisLabel] = [None] * lead
    for k, axis in enumerate(label):
        # an axis kept at its size keeps its label; an expanded size-1 axis is copies of nothing prunable
        result.append(axis if out.shape[k + lead] == ctx.meta(x).shape[k] else None)
    entries = shape_args(ctx, node, 1)
    if len(entries) != out.ndim:
        ctx.freeze(label, "expand with an unrecognised size argument")
        return ctx.unlabeled_output()
    return bind_sizes(ctx, result, out.shape, entries)


@rule(".expand_as", "aten.expand_as")
def expand_as(ctx: RuleContext, node):
    x, other = ctx.arg(0), ctx.arg(1)
    label, target = ctx.tlabel(x), ctx.tlabel(other)
    lead = len(target) - len(label)
    result = list(target)
    for k, axis in enumerate(label):
        if ctx.meta(x).shape[k] == ctx.out.shape[k + lead]:
            # the sizes come from ``other``: an axis of x that keeps its size must shrink with other's
            result[k + lead] = ctx.unify_all([axis, target[k + lead]], ctx.out.shape[k + lead])
    return tuple(result)


@rule(torch.roll, ".roll", "aten.roll")
def roll(ctx: RuleContext, node):
    """Shifting along an axis reorders it: fine for spatial axes, frozen for channel axes."""
    label = list(ctx.tlabel(ctx.arg(0)))
    dims = ctx.arg(2, "dims")
    dims = range(len(label)) if dims is None or dims == [] else [dims] if isinstance(dims, int) else dims
    for d in dims:
        d = norm_dim(d, len(label))
        if label[d] is not None:
            ctx.freeze(label[d], "roll along a channel axis")
            label[d] = None
    return tuple(label)


@rule(".new_empty", ".new_zeros", ".new_ones", ".new_full", ".new_tensor", "aten.new_empty", "aten.new_zeros",
      "aten.new_ones", "aten.new_full")
def new_tensor(ctx: RuleContext, node):
    """``x.new_zeros(size)`` borrows only x's dtype and device: nothing to couple or freeze."""
    return ctx.unlabeled_output()


@rule(".repeat", "aten.repeat", torch.tile, ".tile")
def repeat(ctx: RuleContext, node):
    x = ctx.arg(0)
    label = ctx.tlabel(x)
    out = ctx.out
    lead = out.ndim - len(label)
    result: List[AxisLabel] = [None] * lead
    for k, axis in enumerate(label):
        times = out.shape[k + lead] // max(ctx.meta(x).shape[k], 1)
        # every copy keeps its channel's element, so dropping a channel drops all its copies at once
        result.append(None if axis is None else np.tile(axis, times))
    return tuple(result)


@rule(".repeat_interleave", torch.repeat_interleave, "aten.repeat_interleave")
def repeat_interleave(ctx: RuleContext, node):
    x = ctx.arg(0)
    label = list(ctx.tlabel(x))
    repeats, dim = ctx.arg(1, "repeats"), ctx.arg(2, "dim")
    if not isinstance(repeats, int) or dim is None:
        ctx.freeze(tuple(label), "repeat_interleave without a constant repeat count and dim")
        return ctx.unlabeled_output()
    dim = norm_dim(dim, len(label))
    axis = label[dim]
    if axis is not None:
        # each index repeated in place: LLaMA-style repeat_kv ties each kv head to the query heads reading it
        label[dim] = np.repeat(axis, repeats)
    return tuple(label)
