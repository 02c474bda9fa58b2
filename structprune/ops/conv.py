"""Convolutions: plain, grouped/depthwise, and transposed; module and functional forms.

A plain convolution consumes the input channel space with its weight's input dim and produces a
fresh space owned by its output dim. A depthwise convolution ties group k's input channel and
output channels into one unit, so whole groups are removed and ``groups`` shrinks with them. Any
other grouped convolution keeps its groups and narrows each alike: channel j of every group
(input side and output side separately) is one unit, which is what a weight of shape
(out, in / groups, ...) can lose with a plain index_select.
"""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import nn

from ..graph.labels import AxisLabel
from .context import RuleContext
from .registry import rule


def _tie_positions(ctx: RuleContext, axis: np.ndarray, groups: int) -> None:
    """Channel j of every group becomes one unit, so all groups keep the same width."""
    blocks = axis.reshape(groups, -1)
    ctx.unify(np.tile(blocks[0], groups - 1), blocks[1:].ravel())


def convolution(ctx: RuleContext, x, w0: AxisLabel, w1: AxisLabel, bias: AxisLabel,
                groups: int, transposed: bool, spatial: int):
    """Map labels through a convolution; ``w0``/``w1`` label the weight's first two dims."""
    x_meta = ctx.meta(x)
    x_label = ctx.tlabel(x)
    cax = 1 if x_meta.ndim == spatial + 2 else 0  # batched (N, C, ...) or unbatched (C, ...)
    c_in = x_meta.shape[cax]
    out = list(x_label)
    for i, axis in enumerate(x_label):
        if i != cax and axis is not None:
            ctx.freeze(axis, "spatial axis of a convolution input")
            out[i] = None
    if groups == 1:
        in_axis, out_axis = (w0, w1) if transposed else (w1, w0)
        ctx.unify(x_label[cax], in_axis, c_in)
    elif transposed or w0 is None:
        ctx.freeze(x_label[cax], "grouped transposed convolution")
        ctx.freeze(w0, "grouped transposed convolution")
        ctx.freeze(w1, "grouped transposed convolution")
        return ctx.unlabeled_output()
    else:
        x_axis = x_label[cax] if x_label[cax] is not None else np.full(c_in, -1, np.int64)
        if c_in == groups:  # depthwise (with or without a channel multiplier): remove whole groups
            blocks = np.concatenate([x_axis.reshape(groups, -1), w0.reshape(groups, -1)], axis=1)
            anchors = np.repeat(blocks[:, :1], blocks.shape[1] - 1, axis=1)
            ctx.unify(anchors.ravel(), blocks[:, 1:].ravel())
            ctx.freeze(w1, "the single input position of a depthwise convolution")
        else:  # keep the groups, shrink every group alike: position j of each group is one unit
            _tie_positions(ctx, x_axis, groups)
            _tie_positions(ctx, w0, groups)
            ctx.unify(w1, x_axis[:c_in // groups], c_in // groups)
        out_axis = w0
    out[cax] = out_axis
    ctx.attach(bias, out_axis)
    ctx.state.mark_producer(out_axis)
    return tuple(out)


_CONV_SPATIAL = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3,
                 nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


@rule(*_CONV_SPATIAL)
def conv_module(ctx: RuleContext, node):
    m = ctx.module
    spatial = next(s for cls, s in _CONV_SPATIAL.items() if isinstance(m, cls))
    return convolution(ctx, ctx.arg(0, "input"), ctx.module_param("weight", 0), ctx.module_param("weight", 1),
                       ctx.module_param("bias", 0), m.groups, m.transposed, spatial)


def _functional(spatial: int, transposed: bool):
    def conv_function(ctx: RuleContext, node):
        w_label = ctx.tlabel(ctx.arg(1, "weight"))
        b_label = ctx.tlabel(ctx.arg(2, "bias"))
        w_node = ctx.arg(1, "weight")
        groups = ctx.arg(6, "groups", 1)  # same position in conv and conv_transpose signatures
        if not isinstance(groups, int) or len(w_label) < 2:
            ctx.freeze_inputs("convolution with non-constant groups or weight")
            return ctx.unlabeled_output()
        if groups > 1 and not ctx.own_attribute(w_node, nn.modules.conv._ConvNd, "groups", groups):
            # a constant group count (e.g. a blur filter with groups=channels) cannot follow pruning
            ctx.freeze_inputs("grouped convolution with a constant group count")
            return ctx.unlabeled_output()
        for extra in w_label[2:]:
            ctx.freeze(extra, "kernel axis of a convolution weight")
        return convolution(ctx, ctx.arg(0, "input"), w_label[0], w_label[1],
                           b_label[0] if b_label else None, groups, transposed, spatial)

    return conv_function


for _spatial, _fn, _aten in ((1, F.conv1d, "aten.conv1d"), (2, F.conv2d, "aten.conv2d"),
                             (3, F.conv3d, "aten.conv3d")):
    rule(_fn, _aten)(_functional(_spatial, False))
for _spatial, _fn, _aten in ((1, F.conv_transpose1d, "aten.conv_transpose1d"),
                             (2, F.conv_transpose2d, "aten.conv_transpose2d"),
                             (3, F.conv_transpose3d, "aten.conv_transpose3d")):
    rule(_fn, _aten)(_functional(_spatial, True))
