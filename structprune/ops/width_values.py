"""Channel widths used as numbers: RAFT's correlation volume ``fmap1^T @ fmap2 / sqrt(C)``, C read from the map.

A width read into a *shape* follows pruning (see :mod:`.sizes`). A width read into a *value* does not: the
pruned model computes ``1 / sqrt(C')`` where the original computed ``1 / sqrt(C)``, which no zeroing of
channels reproduces. The channels whose width feeds a value are therefore kept (frozen), as
``scaled_dot_product_attention`` keeps the head dims under its implicit ``1 / sqrt(E)``.

torch.fx shows the read (``getitem(x.shape, 1) ** 0.5``): :func:`freeze_sizes_used_as_values` freezes exactly
the axes read. torch.export bakes the read into a constant (a literal, or a lifted scalar tensor) that
no label leads back to: there :func:`freeze_width_normalised` recognises the normalisation by its value,
a power of the contracted width (C, sqrt(C), 1/sqrt(C) or 1/C) scaling a contraction's result, unless the
calling module stores that value (``self.scale = head_dim ** -0.5`` is a constant the pruned model keeps).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
from torch import fx

from ..graph.attributes import attribute_at
from ..graph.interpreter import mutable
from ..graph.labels import AxisLabel
from ..graph.shapes import TensorMeta
from .context import RuleContext, norm_dim
from .sizes import sizes_read

# ops that only move a contraction's result around, and the ops that scale it
_LAYOUT_OPS = frozenset({"view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze",
                         "contiguous", "clone", "flatten", "unflatten", "t", "expand", "to", "_to_copy"})
_SCALE_OPS = frozenset({"mul", "div", "truediv", "true_divide", "divide", "multiply", "imul", "itruediv"})
_WIDTH_POWERS = (1.0, 0.5, -0.5, -1.0)
_FOLD_DEPTH = 8  # constant subgraphs deeper than this (never a width normalisation) are not folded
_FOLLOW_DEPTH = 4  # layout ops followed from a contraction to its scale


def freeze_sizes_used_as_values(ctx: RuleContext) -> None:
    """Freeze every axis whose run-time size (read under torch.fx) the node's non-tensor arguments are
    computed from: ``x / c ** 0.5`` with ``c = f.shape[1]`` would change its value when ``f`` loses channels."""
    for arg in ctx.tensor_inputs():
        if ctx.is_tensor(arg):
            continue
        for tensor, axis in sizes_read(ctx, arg):
            label = ctx.tlabel(tensor)
            if label:
                ctx.freeze(label[norm_dim(axis, len(label))], "its width is used as a number (e.g. x / sqrt(C))")


def freeze_width_normalised(ctx: RuleContext, contracted: AxisLabel, width: int) -> None:
    """Under torch.export, freeze the ``contracted`` channel axis (of length ``width``) of the running
    contraction when its result is multiplied or divided by a power of ``width``: most likely a normalisation
    computed from the width at run time, which export baked into a constant (see the module docstring).
    Under torch.fx such a constant is one in the model's code too, and stays valid after pruning."""
    if not ctx.exported or contracted is None or width <= 1:
        return
    if any(_is_width_power(value, width) and not _module_constant(ctx, value)
           for value in _scale_factors(ctx, ctx.node, _FOLLOW_DEPTH)):
        ctx.freeze(contracted, f"a contraction over {width} channels normalised by a power of that width (such as "
                               f"1/sqrt(C)), which torch.export baked into a constant")


def _is_width_power(value: float, width: int) -> bool:
    return any(math.isclose(value, width ** p, rel_tol=1e-5) for p in _WIDTH_POWERS)


def _module_constant(ctx: RuleContext, value: float) -> bool:
    """Is ``value`` (or its inverse) a float attribute of the module making the call (``self.scale``)? Then it
    is a constant the model keeps whatever its width, not a width read at run time."""
    module = ctx.calling_module()
    attributes = vars(module).values() if module is not None else ()
    return any(isinstance(v, float) and v and (math.isclose(v, value, rel_tol=1e-6)
                                               or math.isclose(v, 1 / value, rel_tol=1e-6))
               for v in attributes)


def _scale_factors(ctx: RuleContext, node: fx.Node, depth: int) -> Iterator[float]:
    """The constant scalars that multiply or divide ``node``'s value, through up to ``depth`` layout ops."""
    for user in node.users:
        stem = op_stem(user)
        if stem in _SCALE_OPS:
            for other in user.args:
                value = None if other is node else constant_scalar(ctx, other)
                if value is not None:
                    yield value
        elif stem in _LAYOUT_OPS and depth > 0:
            yield from _scale_factors(ctx, user, depth - 1)


def op_stem(node: fx.Node) -> str:
    """The bare name of a node's op, in-place underscore dropped: ``view`` for ``aten.view.default``,
    ``Tensor.view`` and ``torch.view``; ``div`` for ``aten.div_.Tensor``; "" for other kinds of node."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op != "call_function":
        return ""
    elif isinstance(node.target, torch._ops.OpOverload):
        name = node.target.overloadpacket.__name__
    else:
        name = getattr(node.target, "__name__", "")
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def constant_scalar(ctx: RuleContext, value: Any) -> Optional[float]:
    """The value of a scalar that does not depend on the input: a number, or a one-element tensor computed
    from constants only (``sqrt(tensor(128))`` under torch.export); None for anything else."""
    folded = _fold(ctx, value, _FOLD_DEPTH)
    if isinstance(folded, torch.Tensor):
        return float(folded.item()) if folded.numel() == 1 and not folded.is_complex() else None
    return float(folded) if isinstance(folded, (int, float)) and not isinstance(folded, bool) else None


def _fold(ctx: RuleContext, value: Any, depth: int) -> Any:
    """``value`` computed from constants (a fresh tensor, never one the model holds), or None when it reads an
    input, a large tensor or more than ``depth`` ops."""
    if not isinstance(value, fx.Node):
        return value if isinstance(value, (int, float, bool, str, torch.dtype, torch.device, type(None))) else None
    if depth <= 0:
        return None
    if value.op == "get_attr":
        tensor = attribute_at(ctx.root, str(value.target))
        return tensor.detach().clone() if isinstance(tensor, torch.Tensor) and tensor.numel() == 1 else None
    meta, target = ctx.meta(value), value.target
    # only scalars are worth computing: a constant mask or table is never a width normalisation
    if value.op != "call_function" or not callable(target) or (
            isinstance(meta, TensorMeta) and math.prod(meta.shape) > 1):
        return None
    missing = []

    def fold_input(arg: Any) -> Any:
        folded = _fold(ctx, arg, depth - 1)
        if folded is None and arg is not None:
            missing.append(arg)
        return folded

    args = mutable(fx.node.map_aggregate(value.args, fold_input))
    kwargs = mutable(fx.node.map_aggregate(value.kwargs, fold_input))
    if missing:
        return None
    try:
        with torch.no_grad():
            return target(*args, **kwargs)
    except Exception:  # an op that needs what folding cannot give (a device, a generator): not a constant
        return None
