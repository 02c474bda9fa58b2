"""Spatial ops: pooling, resizing (interpolate, upsample) and padding. They only work on the trailing
spatial axes; channel labels pass through, and a channel axis among the spatial ones is frozen."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .context import RuleContext
from .registry import rule


def spatial(ctx: RuleContext, x, n_spatial: int):
    """An op that only works on the last ``n_spatial`` axes: other labels pass through."""
    label = list(ctx.tlabel(x))
    out = ctx.out
    if isinstance(out, (tuple, list)):  # pooling with return_indices
        out = out[0]
    if len(label) != out.ndim:
        ctx.freeze(tuple(label), "spatial op changed the rank")
        return ctx.unlabeled_output()
    for k in range(len(label) - n_spatial, len(label)):
        if label[k] is not None:
            ctx.freeze(label[k], "spatial op over a channel axis")
            label[k] = None
    for k in range(len(label) - n_spatial):
        # an axis outside the spatial ones that changes size (a pad given more pairs than we assumed) is resized
        if label[k] is not None and out.shape[k] != ctx.meta(x).shape[k]:
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


@rule(F.pad, "aten.pad", "aten.constant_pad_nd", "aten.reflection_pad2d", "aten.replication_pad2d")
def pad(ctx: RuleContext, node):
    x = ctx.arg(0, "input")
    amounts = ctx.arg(1, "pad")
    # F.pad takes one (left, right) pair per trailing axis; unknown amounts count as padding every axis
    n = len(amounts) // 2 if isinstance(amounts, (list, tuple)) else ctx.meta(x).ndim
    return spatial(ctx, x, n)
