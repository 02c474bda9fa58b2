"""Axis permutations: permute, transpose/swapaxes, ``.t()``/``.T``, ``.mT``, movedim. Labels move with
their axes; nothing is coupled or frozen."""
from __future__ import annotations

from typing import List

import torch

from ..graph.labels import AxisLabel
from .context import RuleContext, norm_dim
from .registry import rule
from .sizes import shape_args


@rule(".permute", torch.permute, "aten.permute")
def permute(ctx: RuleContext, node):
    label = ctx.tlabel(ctx.arg(0))
    if node.op == "call_method" and len(node.args) > 1:
        dims = shape_args(ctx, node, 1)
    else:
        dims = list(ctx.arg(1, "dims"))
    return tuple(label[norm_dim(d, len(label))] for d in dims)


@rule(".transpose", torch.transpose, "aten.transpose", ".swapaxes", torch.swapaxes, ".swapdims", torch.swapdims)
def transpose(ctx: RuleContext, node):
    label = list(ctx.tlabel(ctx.arg(0)))
    first = ctx.arg(1, "dim0", node.kwargs.get("axis0"))
    second = ctx.arg(2, "dim1", node.kwargs.get("axis1"))
    a, b = norm_dim(first, len(label)), norm_dim(second, len(label))
    label[a], label[b] = label[b], label[a]
    return tuple(label)


@rule(".t", torch.t, "aten.t", "aten.numpy_T")
def matrix_transpose(ctx: RuleContext, node):
    """``x.t()`` and ``x.T``: every axis reversed."""
    return tuple(reversed(ctx.tlabel(ctx.arg(0))))


@rule("aten.mT", "aten.mH", "aten.adjoint")
def last_two_swapped(ctx: RuleContext, node):
    """``x.mT``: the last two axes swapped."""
    label = list(ctx.tlabel(ctx.arg(0)))
    label[-2:] = label[-2:][::-1]
    return tuple(label)


@rule(".movedim", torch.movedim, ".moveaxis", torch.moveaxis)
def movedim(ctx: RuleContext, node):
    label = ctx.tlabel(ctx.arg(0))
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [norm_dim(s, len(label)) for s in src]
    dst = [norm_dim(d, len(label)) for d in dst]
    rest = [k for k in range(len(label)) if k not in src]
    result: List[AxisLabel] = [None] * len(label)
    for s, d in zip(src, dst):
        result[d] = label[s]
    # torch.movedim keeps the unmoved axes in their original order in the slots the moved ones left free
    free = iter(rest)
    for k in range(len(label)):
        if k not in dst:
            result[k] = label[next(free)]
    return tuple(result)
