"""N-ary arithmetic with broadcasting: ``a + b``, ``torch.where``, comparisons, ``addcmul``...

Inputs are aligned from the right as PyTorch broadcasts them; axes of equal size carry the same
channels (unified), a size-1 axis broadcast against a channel axis cannot shrink with it (frozen).
"""
from __future__ import annotations

import operator

import torch

from ..graph.shapes import TensorMeta
from .context import RuleContext
from .registry import rule
from .width_values import freeze_sizes_used_as_values

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
    # ``x / c ** 0.5`` with c read from a channel axis: pruning would change the number, so that axis is kept
    freeze_sizes_used_as_values(ctx)
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
        # a residual add ties both branches channel by channel: what one loses, the other must lose too
        result.append(ctx.unify_all(axes, size) if size > 1 or any(a is not None for a in axes) else None)
    return tuple(result)
