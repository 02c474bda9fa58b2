"""Per-channel ops: activations, dropout, arithmetic with broadcasting, softmax, reductions."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.shapes import TensorMeta
from .context import RuleContext, norm_dim
from .registry import rule

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


@rule(*_UNARY_MODULES, *_UNARY_FUNCTIONS, *("." + n for n in _UNARY_NAMES), *("aten." + n for n in _UNARY_NAMES))
def unary(ctx: RuleContext, node):
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


# ---- n-ary arithmetic with broadcasting ----------------------------------------------------------------
_BINARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.mod,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.and_, operator.or_,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.pow, torch.maximum, torch.minimum, torch.where, torch.lerp, torch.addcmul, torch.addcdiv,
    torch.fmod, torch.remainder, torch.atan2, torch.hypot, torch.masked_fill,
)
_BINARY_NAMES = ("add", "sub", "rsub", "mul", "div", "true_divide", "pow", "maximum", "minimum", "where", "lerp",
                 "addcmul", "addcdiv", "fmod", "remainder", "masked_fill", "eq", "ne", "lt",
                 "le", "gt", "ge", "logical_and", "logical_or", "bitwise_and", "bitwise_or")


@rule(*_BINARY, *("." + n for n in _BINARY_NAMES), *("aten." + n for n in _BINARY_NAMES))
def broadcast_elementwise(ctx: RuleContext, node):
    """Inputs are aligned from the right; axes of equal size are unified, size-1 axes broadcast."""
    out = ctx.out
    if not isinstance(out, TensorMeta):  # arithmetic on sizes and other Python numbers
        if any(ctx.is_tensor(a) for a in ctx.tensor_inputs()):
            ctx.freeze_inputs("elementwise op with a non-tensor result")
        return None
    tensors = [a for a in ctx.tensor_inputs() if ctx.is_tensor(a)]
    result = []
    for i, size in enumerate(out.shape):
        axes = []
        for t in tensors:
            meta, label = ctx.meta(t), ctx.tlabel(t)
            j = i - (out.ndim - meta.ndim)
            if j < 0:
                continue
            if meta.shape[j] == size:
                axes.append(label[j])
            elif label[j] is not None:
                ctx.freeze(label[j], "a channel axis broadcast against a larger axis")
        result.append(ctx.unify_all(axes, size) if size > 1 or any(a is not None for a in axes) else None)
    return tuple(result)


# ---- ops that mix values along one axis -------------------------------------------------------------
def _axis(ctx: RuleContext, node, default) -> int:
    dim = ctx.module.dim if node.op == "call_module" else ctx.arg(1, "dim")
    return default if dim is None else dim


@rule(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax,
      ".softmax", ".log_softmax", "aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax")
def softmax(ctx: RuleContext, node):
    """Normalises across one axis: pruning that axis changes the values (approximate, not frozen)."""
    x = ctx.arg(0)
    label, ndim = ctx.tlabel(x), ctx.meta(x).ndim
    # None: PyTorch's legacy implicit dim (torch.nn.functional._get_softmax_dim)
    dim = norm_dim(_axis(ctx, node, 0 if ndim in (0, 1, 3) else 1), ndim)
    ctx.state.mark_inexact(label[dim], "softmax normalises across the pruned channels")
    return label


@rule(F.normalize)
def normalize(ctx: RuleContext, node):
    """``F.normalize(x, p, dim)``: x / ||x|| along ``dim`` (cosine attention in Swin V2, XCiT). Pruning
    that axis changes the norm: approximate, like LayerNorm; every other axis passes through."""
    x = ctx.arg(0, "input")
    label = ctx.tlabel(x)
    dim = norm_dim(ctx.arg(2, "dim", 1), len(label))
    ctx.state.mark_inexact(label[dim], "normalize divides by a norm over the pruned channels")
    return label


@rule(nn.GLU, F.glu, "aten.glu", ".glu")
def glu(ctx: RuleContext, node):
    """out = a * sigmoid(b) with (a, b) = x.chunk(2, dim): channel i of both halves go together."""
    x = ctx.arg(0)
    label = list(ctx.tlabel(x))
    dim = norm_dim(_axis(ctx, node, -1), len(label))
    if label[dim] is not None:
        half = ctx.meta(x).shape[dim] // 2
        ctx.unify(label[dim][:half], label[dim][half:], half)
        label[dim] = label[dim][:half]
    return tuple(label)


# ---- reductions --------------------------------------------------------------------------------------
_REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
               torch.prod, torch.max, torch.min, torch.norm, torch.nansum, torch.nanmean, torch.argmax, torch.argmin)
_REDUCTION_NAMES = ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "max", "min", "norm",
                    "nansum", "nanmean", "argmax", "argmin")

_STATISTICS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm", "nansum", "nanmean"}


def _op_name(node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    packet = getattr(target, "overloadpacket", None)
    return (packet or target).__name__


def _reduction_arguments(ctx: RuleContext, node):
    """(dim, keepdim) of a reduction, whatever its positional layout (``norm`` takes ``p`` first,
    ``std``/``var`` may take ``unbiased`` before ``keepdim``; numpy's ``axis`` is accepted)."""
    name = _op_name(node).rstrip("_")
    args, kwargs = node.args, node.kwargs
    dim_at = 2 if name == "norm" else 1
    dim = args[dim_at] if len(args) > dim_at else kwargs.get("dim", kwargs.get("axis"))
    keep_at = dim_at + 1
    if name in ("std", "var") and len(args) > 2 and isinstance(args[2], bool):
        keep_at = 3  # (input, dim, unbiased, keepdim)
    keepdim = args[keep_at] if len(args) > keep_at else kwargs.get("keepdim", False)
    return dim, bool(keepdim)


@rule(*_REDUCTIONS, *("." + n for n in _REDUCTION_NAMES), *("aten." + n for n in _REDUCTION_NAMES))
def reduction(ctx: RuleContext, node):
    x = ctx.arg(0)
    meta = ctx.meta(x)
    if not isinstance(meta, TensorMeta):
        return ctx.unlabeled_output()
    label = ctx.tlabel(x)
    other_tensors = [a for a in ctx.tensor_inputs()[1:] if ctx.is_tensor(a)]
    if other_tensors:  # torch.max(a, b) is elementwise
        return broadcast_elementwise(ctx, node)
    dim, keepdim = _reduction_arguments(ctx, node)
    dims = list(range(meta.ndim)) if dim is None else list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if not all(isinstance(d, int) for d in dims):
        ctx.freeze(label, "reduction over non-constant dims")
        return ctx.unlabeled_output()
    dims = {norm_dim(d, meta.ndim) for d in dims}
    statistic = _op_name(node).rstrip("_") in _STATISTICS
    for d in dims:
        if statistic:  # RMSNorm's mean of squares: removing channels changes the value, not the meaning
            ctx.state.mark_inexact(label[d], "a statistic over the pruned channels")
        else:
            ctx.freeze(label[d], "reduction across channels")
    kept = tuple(None if d in dims else label[d] for d in range(meta.ndim) if keepdim or d not in dims)
    out = ctx.out
    if isinstance(out, (tuple, list)):  # max/min with dim -> (values, indices)
        return [kept if isinstance(o, TensorMeta) and o.ndim == len(kept) else None for o in out]
    if not isinstance(out, TensorMeta) or out.ndim != len(kept):
        ctx.freeze(label, "reduction with an unexpected result")
        return ctx.unlabeled_output()
    return kept
