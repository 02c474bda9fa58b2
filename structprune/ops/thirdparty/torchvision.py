"""Rules for functions that model zoos hide from fx with ``torch.fx.wrap``.

Each entry names its reason. This module imports torchvision, so structprune imports it only once
the user has imported torchvision (``register_when_imported`` in ``ops/__init__.py``); structprune never
requires it.
"""
from __future__ import annotations

import importlib
from typing import Any

import numpy as np
from torch import fx

from ...graph.labels import Label
from ..activation import unary
from ..context import RuleContext
from ..registry import rule
from ..reshape import tie_split


def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# stochastic_depth(input, p, mode, training): identity in eval; in training it scales whole samples
# (mode "row") or the whole batch, never individual channels, so channel labels pass through.
_stochastic_depth = _optional("torchvision.ops.stochastic_depth", "stochastic_depth")
if _stochastic_depth is not None:
    rule(_stochastic_depth)(unary)



# torchvision Swin: the attention of a window is one wrapped function, the relative position bias
# table lookup another, and patch merging's strided gather a third. Video Swin (swin3d_*) has 3D twins of
# the first two, with the same leading arguments and channels last.
_shifted_window_attention = _optional("torchvision.models.swin_transformer", "shifted_window_attention")
_relative_position_bias = _optional("torchvision.models.swin_transformer", "_get_relative_position_bias")
_patch_merging_pad = _optional("torchvision.models.swin_transformer", "_patch_merging_pad")
_shifted_window_attention_3d = _optional("torchvision.models.video.swin_transformer", "shifted_window_attention_3d")
_relative_position_bias_3d = _optional("torchvision.models.video.swin_transformer", "_get_relative_position_bias")


def window_attention(ctx: RuleContext, logit_scale: Any) -> Label:
    """(input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, shift_size, attention_dropout,
    dropout, qkv_bias, proj_bias, ...), channels last: the rule shared by 2D and 3D window attention.

    ``head_dim = C // num_heads`` is read from the input width C, so input channel i is tied to
    q/k/v row i (as in ``nn.MultiheadAttention``) and heads are blocks of ``head_dim`` of them.
    ``num_heads`` is the calling module's attribute, rewritten after pruning. ``logit_scale`` (Swin V2's
    per-head temperature, or None) goes with its head."""
    x, qkv_w, proj_w, bias = (ctx.arg(i) for i in range(4))
    num_heads = ctx.arg(5, "num_heads")
    width = ctx.meta(x).shape[-1]
    module = ctx.calling_module()
    if not isinstance(num_heads, int) or module is None or getattr(module, "num_heads", None) != num_heads:
        ctx.freeze_inputs("window attention whose head count is not its module's num_heads")
        return ctx.unlabeled_output()
    x_label, qkv_label, proj_label = ctx.tlabel(x), ctx.tlabel(qkv_w), ctx.tlabel(proj_w)
    qkv_bias_label, proj_bias_label = ctx.tlabel(ctx.arg(9, "qkv_bias")), ctx.tlabel(ctx.arg(10, "proj_bias"))
    # a qkv weight without a label (computed, or size 1) becomes -1s: the unifications below then freeze
    rows = qkv_label[0] if qkv_label and qkv_label[0] is not None else np.full(3 * width, -1, np.int64)
    if qkv_bias_label:
        ctx.unify(rows, qkv_bias_label[0], 3 * width)
    pieces = rows.reshape(3, width)
    # q, k and v rows, the weight's input columns, the input width and the projection's columns are one axis
    readers = (qkv_label[1] if qkv_label else None, x_label[-1] if x_label else None,
               proj_label[1] if proj_label else None)
    for piece in (pieces[1], pieces[2]) + readers:
        ctx.unify(pieces[0], piece, width)
    heads = tie_split(ctx, pieces[0], [num_heads, width // num_heads], 0)
    bias_label = ctx.tlabel(bias)
    if bias_label and len(bias_label) >= 3:
        # the bias is (heads, N, N): each head's bias goes with that head
        ctx.unify(heads, bias_label[-3], num_heads)
        ctx.freeze(bias_label[-2:], "relative positions")
    logit_scale_label = ctx.tlabel(logit_scale)
    if logit_scale_label:
        ctx.unify(heads, logit_scale_label[0], num_heads)
    # the wrapped function receives ``self.num_heads`` as an argument, so the module attribute is the width
    ctx.record_width(ctx.calling_path(), "num_heads", heads)
    ctx.record_head_split(ctx.calling_path(), heads, width // num_heads)
    out_rows = proj_label[0] if proj_label else None
    if proj_bias_label:
        ctx.unify(out_rows, proj_bias_label[0], ctx.out.shape[-1])
    ctx.mark_producer(out_rows)
    return tuple(x_label[:-1]) + (out_rows,)


def relative_position_bias(ctx: RuleContext, node: fx.Node) -> Label:
    """(table[positions, heads], index, window_size) -> [1, heads, N, N]: the heads axis follows."""
    table = ctx.tlabel(ctx.arg(0))
    ctx.freeze(table[0] if table else None, "relative position table rows")
    return (None, table[1] if len(table) > 1 else None, None, None)


if _shifted_window_attention is not None:
    @rule(_shifted_window_attention)
    def shifted_window_attention(ctx: RuleContext, node: fx.Node) -> Label:
        """2D window attention; its 12th argument is Swin V2's ``logit_scale`` (see :func:`window_attention`)."""
        return window_attention(ctx, ctx.arg(11, "logit_scale"))

if _shifted_window_attention_3d is not None:
    @rule(_shifted_window_attention_3d)
    def shifted_window_attention_3d(ctx: RuleContext, node: fx.Node) -> Label:
        """3D (video) window attention: no ``logit_scale``, its 12th argument is ``training``
        (see :func:`window_attention`)."""
        return window_attention(ctx, None)

for _bias_function in (_relative_position_bias, _relative_position_bias_3d):
    if _bias_function is not None:
        rule(_bias_function)(relative_position_bias)

if _patch_merging_pad is not None:
    @rule(_patch_merging_pad)
    def patch_merging_pad(ctx: RuleContext, node):
        """Four strided views of x concatenated on channels: the channel labels repeat four times."""
        label = ctx.tlabel(ctx.arg(0))
        last = label[-1] if label else None
        return (None,) * (ctx.out.ndim - 1) + (None if last is None else np.tile(last, 4),)
