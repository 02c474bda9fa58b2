"""Per-channel ops: activations, dropout and casts (unary), softmax, normalize, GLU.

A unary op maps every output element to the input element at the same index, so labels pass
through unchanged. Softmax and normalize mix values along one axis: pruning that axis changes
the values (marked approximate), every other axis passes through.
"""
from __future__ import annotations

import operator
from typing import Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.shapes import TensorMeta
from .arithmetic import broadcast_elementwise
from .context import RuleContext, norm_dim
from .registry import aten_forms, register_op, rule

# ---- unary ops: every output element depends on the same input element ------------------------------
_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Tanhshrink, nn.Threshold,
    nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.RReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.sigmoid, F.tanh, F.softplus, F.softsign, F.hardtanh, F.tanhshrink, F.threshold,
    F.logsigmoid, F.hardshrink, F.softshrink, F.rrelu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.neg, torch.sqrt, torch.rsqrt,
    torch.sin, torch.cos, torch.erf, torch.clamp, torch.clip, torch.square, torch.reciprocal, torch.sign,
    torch.dropout, torch.clone, torch.detach, torch.nan_to_num, torch.log1p,
    torch.expm1, torch.floor, torch.ceil, torch.round, torch.trunc,
    # *_like factories: the result's shape (and so its channels) follows the input
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
    operator.neg, operator.pos, operator.abs, operator.invert,
)
_UNARY_NAMES = (
    "relu", "sigmoid", "tanh", "exp", "log", "abs", "neg", "sqrt", "rsqrt", "sin", "cos", "erf", "clamp", "clip",
    "square", "reciprocal", "sign", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16",
    "to", "type", "type_as", "cpu", "cuda", "requires_grad", "nan_to_num", "log1p", "expm1", "floor", "ceil",
    "round", "trunc", "hardtanh", "gelu", "silu", "hardswish", "hardsigmoid", "relu6", "leaky_relu",
    "elu", "mish", "softplus", "clamp_min", "clamp_max", "dropout", "native_dropout", "alias", "lift_fresh_copy",
    "_to_copy", "copy", "exp2", "zeros_like", "ones_like", "empty_like", "full_like",
    "fill", "zero",
)


# a method name is also registered as its ATen operator where ATen has one (``x.float()`` has none)
@rule(*_UNARY_MODULES, *_UNARY_FUNCTIONS, *("." + n for n in _UNARY_NAMES), *aten_forms(_UNARY_NAMES))
def unary(ctx: RuleContext, node):
    """Labels pass through; a second tensor input (``clamp(x, min=t)``) meets x elementwise."""
    x = ctx.arg(0)
    out = ctx.out
    if isinstance(out, TensorMeta) and sum(ctx.is_tensor(a) for a in ctx.tensor_inputs()) > 1:
        return broadcast_elementwise(ctx, node)  # clamp(x, min=t), x.copy_(src): values meet elementwise
    if not isinstance(out, (TensorMeta, tuple, list)):
        return None
    label = ctx.tlabel(x)
    if isinstance(out, (tuple, list)):  # e.g. aten.native_dropout -> (output, mask)
        return [label if isinstance(m, TensorMeta) and m.shape == ctx.meta(x).shape else None for m in out]
    if out.shape != ctx.meta(x).shape:
        ctx.freeze(label, "unary op changed the shape")
        return ctx.unlabeled_output()
    return label


# ---- ops that mix values along one axis -------------------------------------------------------------
def _axis(ctx: RuleContext, node, default) -> int:
    if node.op == "call_module":
        dim = cast(Union[nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU], ctx.module).dim
    else:
        dim = ctx.arg(1, "dim")
    return default if dim is None else dim


_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)


@rule(*_SOFTMAX_MODULES, F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax,
      ".softmax", ".log_softmax", "aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax")
def softmax(ctx: RuleContext, node):
    """Normalises across one axis: pruning that axis changes the values (approximate, not frozen)."""
    x = ctx.arg(0)
    label, ndim = ctx.tlabel(x), ctx.meta(x).ndim
    # None: PyTorch's legacy implicit dim (torch.nn.functional._get_softmax_dim)
    dim = norm_dim(_axis(ctx, node, 0 if ndim in (0, 1, 3) else 1), ndim)
    ctx.mark_inexact(label[dim], "softmax normalises across the pruned channels")
    return label


@rule(F.normalize)
def normalize(ctx: RuleContext, node):
    """``F.normalize(x, p, dim)``: x / ||x|| along ``dim`` (cosine attention in Swin V2, XCiT). Pruning
    that axis changes the norm: approximate, like LayerNorm; every other axis passes through."""
    x = ctx.arg(0, "input")
    label = ctx.tlabel(x)
    dim = norm_dim(ctx.arg(2, "dim", 1), len(label))
    ctx.mark_inexact(label[dim], "normalize divides by a norm over the pruned channels")
    return label


@rule(nn.GLU, F.glu, "aten.glu", ".glu")
def glu(ctx: RuleContext, node):
    """out = a * sigmoid(b) with (a, b) = x.chunk(2, dim): channel i of both halves go together."""
    x = ctx.arg(0)
    label = list(ctx.tlabel(x))
    dim = norm_dim(_axis(ctx, node, -1), len(label))
    axis = label[dim]
    if axis is not None:
        half = ctx.meta(x).shape[dim] // 2
        # channel i of the value half is gated by channel i of the gate half: they can only go together
        ctx.unify(axis[:half], axis[half:], half)
        label[dim] = axis[:half]
    return tuple(label)


def same_shape(module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Meta shape of a parameter-free module that keeps its input's shape. (Modules with parameters
    run on meta tensors instead, so that a mismatched input still raises.)"""
    return x


register_op(*_UNARY_MODULES, *_SOFTMAX_MODULES, shape=same_shape)
