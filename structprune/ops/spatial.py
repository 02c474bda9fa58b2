"""Spatial ops: pooling, resizing (interpolate, upsample), padding, sampling at coordinates
(``affine_grid``, ``grid_sample``) and sliding windows (``Tensor.unfold``). They only work on spatial
axes; channel labels pass through, and a channel axis among the spatial ones is frozen."""
from __future__ import annotations

from typing import Iterable, Sequence, Set

import torch
import torch.nn.functional as F
from torch import nn

from .context import RuleContext
from .registry import rule


def spatial(ctx: RuleContext, x, n_spatial: int):
    """An op that only works on the last ``n_spatial`` axes: other labels pass through."""
    ndim = len(ctx.tlabel(x))
    return spatial_axes(ctx, x, range(max(ndim - n_spatial, 0), ndim))


def spatial_axes(ctx: RuleContext, x, axes: Iterable[int]):
    """An op that only works on ``axes`` (resizes or pads them): a channel label there is frozen, the
    other labels pass through."""
    label = list(ctx.tlabel(x))
    out = ctx.out
    if isinstance(out, (tuple, list)):  # pooling with return_indices
        out = out[0]
    if len(label) != out.ndim:
        ctx.freeze(tuple(label), "spatial op changed the rank")
        return ctx.unlabeled_output()
    axes = set(axes)
    for k in sorted(axes):
        if label[k] is not None:
            ctx.freeze(label[k], "spatial op over a channel axis")
            label[k] = None
    for k in range(len(label)):
        # an axis outside the spatial ones that changes size (a pad given more pairs than we assumed) is resized
        if k not in axes and label[k] is not None and out.shape[k] != ctx.meta(x).shape[k]:
            ctx.freeze(label[k], "spatial op changed a channel axis")
            label[k] = None
    result = tuple(label)
    return [result, None] if isinstance(ctx.out, (tuple, list)) else result


_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2, nn.FractionalMaxPool2d: 2,
    nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3, nn.ConstantPad1d: 1, nn.ConstantPad2d: 2,
    nn.ConstantPad3d: 3, nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReflectionPad3d: 3,
    nn.ReplicationPad1d: 1, nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3, nn.CircularPad1d: 1,
    nn.CircularPad2d: 2, nn.CircularPad3d: 3,
}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
    "aten.max_pool1d": 1, "aten.max_pool2d": 2, "aten.max_pool3d": 3, "aten.avg_pool1d": 1,
    "aten.avg_pool2d": 2, "aten.avg_pool3d": 3, "aten.adaptive_avg_pool1d": 1, "aten.adaptive_avg_pool2d": 2,
    "aten.adaptive_avg_pool3d": 3, "aten.max_pool2d_with_indices": 2, "aten.max_pool3d_with_indices": 3,
    "aten.adaptive_max_pool2d": 2, "aten.adaptive_max_pool1d": 1, "aten._adaptive_avg_pool2d": 2,
}


@rule(*_POOL_MODULES)
def pool_module(ctx: RuleContext, node):
    m = ctx.module
    n = next(s for cls, s in _POOL_MODULES.items() if isinstance(m, cls))
    return spatial(ctx, ctx.arg(0, "input"), n)


def _fixed_spatial(n: int):
    return lambda ctx, node: spatial(ctx, ctx.arg(0, "input"), n)


for _target, _axes in _POOL_FUNCTIONS.items():
    rule(_target)(_fixed_spatial(_axes))


@rule(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, nn.Upsample, nn.UpsamplingNearest2d,
      nn.UpsamplingBilinear2d, "aten.upsample_nearest1d", "aten.upsample_nearest2d", "aten.upsample_nearest3d",
      "aten.upsample_bilinear2d", "aten.upsample_bicubic2d", "aten.upsample_linear1d", "aten.upsample_trilinear3d")
def resize(ctx: RuleContext, node):
    x = ctx.arg(0, "input")
    # interpolate resizes every axis after (N, C); an unbatched input still has at least one
    return spatial(ctx, x, max(ctx.meta(x).ndim - 2, 1))


def _padded_axes(amounts: Sequence, ndim: int) -> Set[int]:
    """The axes ``F.pad``'s ``amounts`` pads: one (left, right) pair per axis from the last one backwards.
    A pair of literal zeros leaves its axis alone (Swin pads H and W to a window multiple with computed
    amounts and the channel axis with ``(0, 0)``); a computed amount may pad, whatever its example value."""
    pairs = [amounts[i:i + 2] for i in range(0, len(amounts) - 1, 2)]
    return {ndim - 1 - k for k, pair in enumerate(pairs)
            if not all(isinstance(a, int) and not isinstance(a, bool) and a == 0 for a in pair)}


@rule(F.pad, "aten.pad", "aten.constant_pad_nd", "aten.reflection_pad2d", "aten.replication_pad2d")
def pad(ctx: RuleContext, node):
    """Padding: the padded axes are spatial (a channel axis among them is frozen); the rest pass through."""
    x = ctx.arg(0, "input")
    amounts = ctx.arg(1, "pad")
    ndim = ctx.meta(x).ndim
    if not isinstance(amounts, (list, tuple)):  # unknown amounts count as padding every axis
        return spatial(ctx, x, ndim)
    return spatial_axes(ctx, x, _padded_axes(amounts, ndim))


@rule(".unfold", "aten.unfold")
def sliding_windows(ctx: RuleContext, node):
    """``x.unfold(dim, size, step)``: windows along ``dim`` (it becomes the window count) in a new last axis.
    Every other axis passes through; windows over a channel axis freeze it. (``F.unfold``, im2col, is a
    different op: it folds channels and kernel positions into one axis.)"""
    x, dim = ctx.arg(0), ctx.arg(1, "dimension")
    label = list(ctx.tlabel(x))
    if not isinstance(dim, int) or ctx.out.ndim != len(label) + 1 or not -len(label) <= dim < len(label):
        ctx.freeze(tuple(label), "unfold with a dimension that is not a constant")
        return ctx.unlabeled_output()
    dim %= len(label)
    if label[dim] is not None:
        ctx.freeze(label[dim], "unfold slides windows over a channel axis")
        label[dim] = None
    return tuple(label) + (None,)


@rule(F.affine_grid, torch.affine_grid_generator, "aten.affine_grid_generator")
def affine_grid(ctx: RuleContext, node):
    """``affine_grid(theta (N, d, d+1), size)``: sampling coordinates from a transform; theta's axes are
    coordinates, never channels (they freeze), and the grid carries none."""
    ctx.freeze(ctx.tlabel(ctx.arg(0, "theta")), "affine_grid's theta holds a transform, not channels")
    return ctx.unlabeled_output()


@rule(F.grid_sample, "aten.grid_sampler", "aten.grid_sampler_2d", "aten.grid_sampler_3d")
def grid_sample(ctx: RuleContext, node):
    """``grid_sample(input (N, C, *in), grid (N, *out, d))`` -> ``(N, C, *out)``: every channel is sampled at
    the same coordinates, so the channels pass through exactly; a channel label on the grid (its coordinates
    or its spatial axes) freezes it."""
    x, grid = ctx.arg(0, "input"), ctx.arg(1, "grid")
    ctx.freeze(ctx.tlabel(grid), "grid_sample coordinates computed from channels")
    return spatial_axes(ctx, x, range(2, len(ctx.tlabel(x))))
