"""Convolutions: plain, grouped/depthwise, and transposed; module and functional forms.

A plain convolution consumes the input channel space with its weight's input dim and produces a
fresh space owned by its output dim. A depthwise convolution ties group k's input channel and
output channels into one unit, so whole groups are removed and ``groups`` shrinks with them. Any
other grouped convolution keeps its groups and narrows each alike: channel j of every group
(input side and output side separately) is one unit, which is what a weight of shape
(out, in / groups, ...) can lose with a plain index_select.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..graph.labels import AxisLabel
from .context import RuleContext
from .registry import register_op, rule


def _tie_positions(ctx: RuleContext, axis: np.ndarray, groups: int) -> None:
    """Channel j of every group becomes one unit, so all groups keep the same width."""
    blocks = axis.reshape(groups, -1)
    # rows are groups: tiling group 0's labels against every later group ties channel j across all of them
    ctx.unify(np.tile(blocks[0], groups - 1), blocks[1:].ravel())


def convolution(ctx: RuleContext, x, weight_dim0: AxisLabel, weight_dim1: AxisLabel, bias: AxisLabel,
                groups: int, transposed: bool, spatial: int):
    """Map labels through a convolution; ``weight_dim0``/``weight_dim1`` label the weight's first two dims."""
    x_meta = ctx.meta(x)
    x_label = ctx.tlabel(x)
    cax = 1 if x_meta.ndim == spatial + 2 else 0  # batched (N, C, ...) or unbatched (C, ...)
    c_in = x_meta.shape[cax]
    out = list(x_label)
    for i, axis in enumerate(x_label):
        # a label on a spatial axis (after a permute) cannot follow a sliding window: each output mixes positions
        if i != cax and axis is not None:
            ctx.freeze(axis, "spatial axis of a convolution input")
            out[i] = None
    if groups == 1:
        # a transposed weight is stored (in, out / groups, ...): its dim 0 is the side that reads the input
        in_axis, out_axis = (weight_dim0, weight_dim1) if transposed else (weight_dim1, weight_dim0)
        ctx.unify(x_label[cax], in_axis, c_in)
    # grouped transposed weights put the groups on dim 1, and an unlabelled dim 0 has nothing to tie: rare, frozen
    elif transposed or weight_dim0 is None:
        ctx.freeze(x_label[cax], "grouped transposed convolution")
        ctx.freeze(weight_dim0, "grouped transposed convolution")
        ctx.freeze(weight_dim1, "grouped transposed convolution")
        return ctx.unlabeled_output()
    else:
        # an unlabelled input (the image itself) becomes -1s, which the unifications below turn into freezes
        x_axis = x_label[cax]
        if x_axis is None:
            x_axis = np.full(c_in, -1, np.int64)
        if c_in == groups:  # depthwise (with or without a channel multiplier): remove whole groups
            # row k: group k's input channel, then its outputs (channel multiplier); tied to column 0: one unit
            blocks = np.concatenate([x_axis.reshape(groups, -1), weight_dim0.reshape(groups, -1)], axis=1)
            anchors = np.repeat(blocks[:, :1], blocks.shape[1] - 1, axis=1)
            ctx.unify(anchors.ravel(), blocks[:, 1:].ravel())
            ctx.freeze(weight_dim1, "the single input position of a depthwise convolution")
        else:  # keep the groups, shrink every group alike: position j of each group is one unit
            _tie_positions(ctx, x_axis, groups)
            _tie_positions(ctx, weight_dim0, groups)
            # dim 1 of the weight indexes positions within a group; group 0 stands for all after the tying above
            ctx.unify(weight_dim1, x_axis[:c_in // groups], c_in // groups)
        out_axis = weight_dim0
    out[cax] = out_axis
    ctx.attach(bias, out_axis)
    ctx.mark_producer(out_axis)
    return tuple(out)


_CONV_SPATIAL = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3,
                 nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


@rule(*_CONV_SPATIAL)
def conv_module(ctx: RuleContext, node):
    m = cast(nn.modules.conv._ConvNd, ctx.module)
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
        # fx bakes ``self.groups`` into the call as a literal; it is safe only when it is the calling conv's own
        # attribute, which update_conv refreshes (timm's Conv2dSame calls F.conv2d from its forward)
        if groups > 1 and not ctx.own_attribute(w_node, nn.modules.conv._ConvNd, "groups", groups):
            # a constant group count (e.g. a blur filter with groups=channels) cannot follow pruning
            ctx.freeze_inputs("grouped convolution with a constant group count")
            return ctx.unlabeled_output()
        for extra in w_label[2:]:
            ctx.freeze(extra, "kernel axis of a convolution weight")
        return convolution(ctx, ctx.arg(0, "input"), w_label[0], w_label[1],
                           b_label[0] if b_label else None, groups, transposed, spatial)

    return conv_function


_fn: Callable[..., torch.Tensor]
for _spatial, _fn, _aten in ((1, F.conv1d, "aten.conv1d"), (2, F.conv2d, "aten.conv2d"),
                             (3, F.conv3d, "aten.conv3d")):
    rule(_fn, _aten)(_functional(_spatial, False))
for _spatial, _fn, _aten in ((1, F.conv_transpose1d, "aten.conv_transpose1d"),
                             (2, F.conv_transpose2d, "aten.conv_transpose2d"),
                             (3, F.conv_transpose3d, "aten.conv_transpose3d")):
    rule(_fn, _aten)(_functional(_spatial, True))


def conv_shape(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Output of a (non-transposed) convolution on the meta device, from its attributes."""
    k = len(module.kernel_size)
    padding: Optional[Sequence[int]]
    if isinstance(module.padding, str):
        padding = [0] * k if module.padding == "valid" else None
    else:
        padding = module.padding
    spatial = []
    for i, size in enumerate(x.shape[-k:]):
        # torch only allows padding="same" with stride 1, so the size is kept exactly
        if padding is None:  # "same"
            spatial.append(size)
            continue
        span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        spatial.append((size + 2 * padding[i] - span) // module.stride[i] + 1)
    if min(spatial) <= 0 or x.shape[-k - 1] != module.in_channels:
        raise RuntimeError("convolution does not fit its input")  # let the real op raise its own error
    return x.new_empty(tuple(x.shape[:-k - 1]) + (module.out_channels,) + tuple(spatial))


def update_conv(module: nn.modules.conv._ConvNd, old: Dict[str, tuple]) -> None:
    """Re-derive channel counts (and a depthwise convolution's ``groups``) from the sliced weight."""
    weight = module.weight
    if module.groups > 1 and not module.transposed and old["weight"][1] == 1:
        # depthwise: whole groups were removed, groups shrink with the output channels
        # exact: whole groups went with their multiplier's outputs, so outputs and groups shrank by the same share
        module.groups = module.groups * weight.shape[0] // old["weight"][0]
    if module.transposed:
        module.in_channels, module.out_channels = weight.shape[0], weight.shape[1] * module.groups
    else:
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups


# element masks cover plain convolutions by default, not transposed ones
register_op(nn.Conv1d, nn.Conv2d, nn.Conv3d, shape=conv_shape, weighted=True)
register_op(*_CONV_SPATIAL, update=update_conv)
# every convolution, lazy and custom subclasses included: its weight (out, in / groups, ...) reads its
# input with dim 1; a transposed one stores (in, out / groups, ...)
register_op(nn.modules.conv._ConvNd, width="out_channels", input_axes={"weight": 1})
register_op(nn.modules.conv._ConvTransposeNd, input_axes={"weight": 0})
