"""Reductions: ``mean``, ``sum``, ``amax``, ``norm``, ``linalg.vector_norm``, ``argmax``... over some axes.

A statistic over a channel axis (RMSNorm's mean of squares) keeps its meaning when channels go, so
the axis is marked approximate; any other reduction across channels (``argmax``, ``prod``) is frozen.
Reduced axes disappear (or become unlabelled with ``keepdim``); the others pass through.
"""
from __future__ import annotations

import torch

from ..graph.shapes import TensorMeta
from .arithmetic import broadcast_elementwise
from .context import RuleContext, norm_dim
from .registry import rule

_REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
               torch.prod, torch.max, torch.min, torch.norm, torch.nansum, torch.nanmean, torch.argmax, torch.argmin,
               torch.linalg.vector_norm)
_REDUCTION_NAMES = ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "max", "min", "norm",
                    "nansum", "nanmean", "argmax", "argmin")
# (input, ord, dim, keepdim): torch.linalg.vector_norm, and under torch.export the decomposition of F.normalize
# (Hugging Face Swin V2's cosine attention) and of torch.norm
_VECTOR_NORMS = ("linalg_vector_norm",)

# left out on purpose: argmax/argmin and max/min with a dim return positions, which pruning renumbers, and a
# product over channels becomes 0 when one is zeroed, so neither has an approximate meaning
_STATISTICS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm", "nansum", "nanmean", *_VECTOR_NORMS}
# the ops that take the order ``p`` before ``dim``
_ORDER_FIRST = {"norm", *_VECTOR_NORMS}


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
    dim_at = 2 if name in _ORDER_FIRST else 1
    dim = args[dim_at] if len(args) > dim_at else kwargs.get("dim", kwargs.get("axis"))
    keep_at = dim_at + 1
    if name in ("std", "var") and len(args) > 2 and isinstance(args[2], bool):
        keep_at = 3  # (input, dim, unbiased, keepdim)
    keepdim = args[keep_at] if len(args) > keep_at else kwargs.get("keepdim", False)
    return dim, bool(keepdim)


@rule(*_REDUCTIONS, *("." + n for n in _REDUCTION_NAMES), *("aten." + n for n in _REDUCTION_NAMES + _VECTOR_NORMS))
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
    given = list(range(meta.ndim)) if dim is None else list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if not all(isinstance(d, int) for d in given):
        ctx.freeze(label, "reduction over non-constant dims")
        return ctx.unlabeled_output()
    dims = {norm_dim(d, meta.ndim) for d in given}
    statistic = _op_name(node).rstrip("_") in _STATISTICS
    for d in dims:
        if statistic:  # RMSNorm's mean of squares: removing channels changes the value, not the meaning
            ctx.mark_inexact(label[d], "a statistic over the pruned channels")
        else:
            ctx.freeze(label[d], "reduction across channels")
    # keepdim leaves a size-1 axis where the reduced one was: it carries no label
    kept = tuple(None if d in dims else label[d] for d in range(meta.ndim) if keepdim or d not in dims)
    out = ctx.out
    if isinstance(out, (tuple, list)):  # max/min with dim -> (values, indices)
        return [kept if isinstance(o, TensorMeta) and o.ndim == len(kept) else None for o in out]
    if not isinstance(out, TensorMeta) or out.ndim != len(kept):
        ctx.freeze(label, "reduction with an unexpected result")
        return ctx.unlabeled_output()
    return kept
