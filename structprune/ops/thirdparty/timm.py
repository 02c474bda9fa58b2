"""``timm`` layers that fx would trace into and freeze, registered by class name so timm need not be installed.

**Weight-standardised convolutions** (``timm.layers.std_conv``: ``StdConv2d``, ``ScaledStdConv2d`` and
their ``...Same`` padding variants; NFNet, NF-ResNet, BiT). Their forward standardises the weight per
output filter, ``w_hat[o] = gain[o] * scale * (w[o] - mean(w[o])) / sqrt(var(w[o]) + eps)``, with the mean
and variance over the filter's fan-in (``in / groups * kh * kw``), and convolves with ``w_hat``. Traced,
that is a reshape of the weight merging its input and kernel axes, which freezes every channel the
layer touches. As one leaf they map channels like a convolution, with two differences:

* an *output* channel is one filter, standardised on its own: removing it (its weight row, bias and
  ``gain[o]``) leaves every other filter unchanged. Exact;
* an *input* channel is part of every filter's fan-in, so removing it changes the mean and variance of
  all of them. No choice of the remaining weights can undo that: standardised filters always have mean
  0 over their fan-in, while the kept part of an original standardised filter in general does not. So
  the input axis is marked approximate (like LayerNorm over a pruned axis) rather than frozen, which
  would freeze the whole width between two such layers. ``scale`` (``gamma / sqrt(fan_in)``, fixed at
  construction) is kept: the kept weights then keep about their original magnitude. A depthwise layer
  loses whole filters with their one input channel: exact.

**Selective-kernel attention** (``timm.layers.selective_kernel.SelectiveKernelAttn``; SKNet). Its input
is the paths stacked on dim 1, ``(B, paths, C, H, W)``; it sums the paths, pools, runs a reduce ->
norm -> act -> select MLP whose select conv emits ``paths * C`` logits, views them as ``(B, paths, C,
1, 1)`` (``C // self.num_paths``, a computed size) and takes the softmax over the paths. Channel c of
the input is read by column c of ``fc_reduce`` and produces row c of every path's block of
``fc_select``; the softmax is over paths, not channels, so each channel's weights stay its own. The
attention's hidden width is a structure of its own. All of it is exact. ``SelectiveKernel`` itself is
traced: its paths are stacked (``torch.stack``) and its input is split evenly with
``torch.split(x, self.in_channels // self.num_paths, 1)``, which the generic split rule follows by
rewriting ``in_channels`` (the ``split_total`` size role, ``ops/size_names.py``).
"""
from __future__ import annotations

from typing import Protocol, cast

import numpy as np
from torch import fx, nn

from ...graph.labels import AxisLabel, Label
from ..activation import unary
from ..context import RuleContext
from ..conv import conv_module
from ..registry import module_rule, rule

STD_CONVS = tuple(f"timm.layers.std_conv.{name}"
                  for name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"))
SK_ATTENTION = "timm.layers.selective_kernel.SelectiveKernelAttn"

_STANDARDISED_FAN_IN = ("weight standardisation: each filter's mean and variance over its fan-in change when "
                        "input channels go")


# ---- weight-standardised convolutions ----------------------------------------------------------------------
@rule(*STD_CONVS)
def std_conv(ctx: RuleContext, node: fx.Node) -> Label:
    """Weight-standardised convolution: output channels exact, input channels approximate.

    Output channels take their weight row, bias and ``gain`` row; input channels shift every filter's
    standardisation statistics (see the module docstring)."""
    conv = cast(nn.Conv2d, ctx.module)
    label = conv_module(ctx, node)
    # ScaledStdConv2d's gain is (out, 1, 1, 1): one factor per filter, sliced with its weight row
    ctx.attach(ctx.module_param("gain", 0), ctx.module_param("weight", 0), conv.out_channels)
    if conv.groups != conv.in_channels:  # depthwise layers lose whole filters: nothing left is re-standardised
        ctx.mark_inexact(ctx.module_param("weight", 1), _STANDARDISED_FAN_IN)
    return label


# ---- selective-kernel attention ----------------------------------------------------------------------------
class _SelectiveKernelAttn(Protocol):
    """What the rule reads of ``timm.layers.selective_kernel.SelectiveKernelAttn`` (not imported)."""

    num_paths: int
    fc_reduce: nn.Module
    bn: nn.Module
    act: nn.Module
    fc_select: nn.Module


def _is_pointwise(module: nn.Module) -> bool:
    """A plain 1x1 convolution without groups, whose weight rows and columns are its channels."""
    return (type(module) is nn.Conv2d and cast(nn.Conv2d, module).groups == 1
            and cast(nn.Conv2d, module).kernel_size == (1, 1))


def _is_per_channel(module: nn.Module) -> bool:
    """Keeps channels apart: an elementwise activation, or a BatchNorm (timm's BatchNormAct2d adds an
    activation and dropout to it, both per channel)."""
    return module_rule(module) is unary or isinstance(module, nn.modules.batchnorm._BatchNorm)


def _param(ctx: RuleContext, owner: str, name: str, dim: int) -> AxisLabel:
    """Axis ``dim`` of ``<module>.<owner>.<name>`` (None when absent)."""
    return ctx.param_axis(ctx.module.get_submodule(owner), f"{ctx.module_path}.{owner}", name, dim)


def _hidden_width(ctx: RuleContext, attn: _SelectiveKernelAttn) -> None:
    """fc_reduce's rows, the norm's statistics and fc_select's columns are one width; it is pruned when
    the norm and activation between them keep channels apart, else frozen."""
    hidden = _param(ctx, "fc_reduce", "weight", 0)
    if hidden is None:  # a computed weight: nothing to slice
        return
    readers = [_param(ctx, "fc_select", "weight", 1), _param(ctx, "fc_reduce", "bias", 0)]
    readers += [_param(ctx, "bn", name, 0) for name in ("weight", "bias", "running_mean", "running_var")]
    for reader in readers:
        ctx.attach(reader, hidden, len(hidden))
    if not (_is_per_channel(attn.bn) and _is_per_channel(attn.act)):
        ctx.freeze(hidden, "selective-kernel attention with a norm or activation that mixes channels")
        return
    ctx.mark_producer(hidden)


def _path_logits(ctx: RuleContext, channel: np.ndarray, paths: int) -> None:
    """fc_select's output row ``p * C + c`` is path p's logit for channel c: tie it (and its bias) to c."""
    rows = _param(ctx, "fc_select", "weight", 0)
    if rows is None:
        ctx.freeze(channel, "selective-kernel attention whose select weight is computed")
        return
    ctx.attach(_param(ctx, "fc_select", "bias", 0), rows)
    for block in rows.reshape(paths, -1):
        ctx.unify(block, channel, len(channel))


@rule(SK_ATTENTION)
def selective_kernel_attention(ctx: RuleContext, node: fx.Node) -> Label:
    """Selective-kernel attention: channels pass through, the softmax is over the paths.

    ``(B, paths, C, H, W)`` -> per-path, per-channel weights ``(B, paths, C, 1, 1)``: channel c keeps
    its label; the attention's hidden width is a structure of its own (see the module docstring)."""
    attn = cast(_SelectiveKernelAttn, ctx.module)
    x = ctx.arg(0, "x")
    label = ctx.tlabel(x)
    shape = ctx.meta(x).shape
    if len(label) != 5 or not (_is_pointwise(attn.fc_reduce) and _is_pointwise(attn.fc_select)) \
            or shape[1] != attn.num_paths:
        ctx.freeze_inputs("selective-kernel attention of an unexpected layout")
        return ctx.unlabeled_output()
    # the paths are summed and the positions pooled: a label there could not follow
    for k in (0, 1, 3, 4):
        ctx.freeze(label[k], "selective-kernel attention sums its paths and pools its positions")
    channel = label[2] if label[2] is not None else np.full(shape[2], -1, np.int64)
    ctx.unify(channel, _param(ctx, "fc_reduce", "weight", 1), shape[2])
    _hidden_width(ctx, attn)
    _path_logits(ctx, channel, attn.num_paths)
    return (None, None, label[2], None, None)
