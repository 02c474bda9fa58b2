"""Joining and splitting along an axis: cat, stack, chunk, split, tensor_split, unbind, and named-tuple
output containers.

Concatenating channel axes concatenates their labels; the other axes of the inputs are unified.
Along a channel axis only equal pieces whose count (not size) is fixed stay prunable when split.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from ..graph.labels import AxisLabel
from .context import RuleContext, norm_dim
from .registry import rule
from .sizes import adaptable_literal


def _as_array(axis: AxisLabel, size: int) -> np.ndarray:
    return np.full(size, -1, np.int64) if axis is None else axis


@rule(torch.cat, torch.concat, torch.concatenate, "aten.cat", "aten.concat")
def cat(ctx: RuleContext, node):
    # torch.cat skips 1-d empty tensors of any rank (an empty KV cache is one)
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t)
               and not (ctx.meta(t).ndim == 1 and ctx.meta(t).shape[0] == 0 and ctx.out.ndim != 1)]
    dim = norm_dim(ctx.arg(1, "dim", node.kwargs.get("axis", 0)), ctx.out.ndim)
    labels = [ctx.tlabel(t) for t in tensors]
    metas = [ctx.meta(t) for t in tensors]
    out: List[AxisLabel] = []
    for k in range(ctx.out.ndim):
        if k == dim:
            # each input's channels keep their own elements at their offset in the output (DenseNet's concatenated
            # features); an unlabelled input fills its run with -1, so the consumer freezes only those positions
            parts = [_as_array(lab[k], m.shape[k]) for lab, m in zip(labels, metas)]
            merged = np.concatenate(parts) if parts else None
            out.append(merged if merged is not None and (merged >= 0).any() else None)
        else:
            out.append(ctx.unify_all([lab[k] for lab in labels], ctx.out.shape[k]))
    return tuple(out)


@rule(torch.stack, "aten.stack")
def stack(ctx: RuleContext, node):
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t)]
    dim = norm_dim(ctx.arg(1, "dim", 0), ctx.out.ndim)
    labels = [ctx.tlabel(t) for t in tensors]
    # stacked inputs share every axis; the new axis counts inputs, not channels, so it carries no label
    base = [ctx.unify_all([lab[k] for lab in labels], ctx.meta(tensors[0]).shape[k]) for k in range(len(labels[0]))]
    return tuple(base[:dim]) + (None,) + tuple(base[dim:])


def _pieces(ctx: RuleContext, x, dim: int, sizes: Sequence[int], dynamic: bool):
    """Labels of the pieces of ``x`` cut along ``dim``.

    Along a channel axis only equal pieces whose count (not size) is fixed stay prunable: their
    channels are tied position by position so every piece shrinks identically.
    """
    label = ctx.tlabel(x)
    axis = label[dim]
    results = []
    if axis is not None:
        # chunk(2) of a fused projection (SwiGLU's gate and value): tie channel i of every piece, so all pieces
        # shrink alike and the cut still falls between them after pruning
        if dynamic and len(set(sizes)) == 1 and len(sizes) > 1:
            pieces = axis.reshape(len(sizes), -1)
            for p in pieces[1:]:
                ctx.unify(pieces[0], p, len(p))
        elif len(sizes) > 1:
            # cut points written into the code would land in the wrong place once the axis shrinks
            ctx.freeze(axis, "split of a channel axis into constant-size pieces")
    start = 0
    for size in sizes:
        piece = list(label)
        piece[dim] = None if axis is None else axis[start:start + size]
        results.append(tuple(piece))
        start += size
    return results


@rule(torch.chunk, ".chunk", "aten.chunk", torch.tensor_split, ".tensor_split")
def chunk(ctx: RuleContext, node):
    x = ctx.arg(0)
    dim = norm_dim(ctx.arg(2, "dim", 0), ctx.meta(x).ndim)
    sizes = [m.shape[dim] for m in ctx.out]
    # chunk(n) and tensor_split(n) cut by a count that follows the pruned size; tensor_split with
    # explicit indices cuts at constants
    dynamic = "chunk" in str(node.target) or isinstance(ctx.arg(1, "sections"), int)
    return _pieces(ctx, x, dim, sizes, dynamic=dynamic)


@rule(torch.split, ".split", "aten.split", "aten.split_with_sizes")
def split(ctx: RuleContext, node):
    """Split into pieces. Equal pieces along a channel axis stay prunable when the piece size is a
    module's size attribute (GPT-2's fused ``c_attn(x).split(self.split_size)``), or that attribute
    divided by the piece count (timm's ``x.split(self.in_channels // self.num_paths)``): the pieces are
    tied position by position and the attribute is rewritten after pruning."""
    x = ctx.arg(0)
    dim = norm_dim(ctx.arg(2, "dim", 0), ctx.meta(x).ndim)
    sizes = [m.shape[dim] for m in ctx.out]
    piece = ctx.arg(1, "split_size", node.kwargs.get("split_size_or_sections"))
    axis = ctx.tlabel(x)[dim]
    # the attribute sizes one piece (bound to the first piece's elements) or all of them (bound to the whole
    # axis); _pieces ties the other pieces to the first
    adaptable = (axis is not None and isinstance(piece, int) and len(sizes) > 1 and len(set(sizes)) == 1
                 and (adaptable_literal(ctx, piece, "split", axis[:piece])
                      or adaptable_literal(ctx, piece * len(sizes), "split_total", axis)))
    return _pieces(ctx, x, dim, sizes, dynamic=adaptable)


@rule(torch.unbind, ".unbind", "aten.unbind")
def unbind(ctx: RuleContext, node):
    x = ctx.arg(0)
    label = ctx.tlabel(x)
    dim = norm_dim(ctx.arg(1, "dim", 0), len(label))
    ctx.freeze(label[dim], "unbind along a channel axis")
    rest = tuple(a for k, a in enumerate(label) if k != dim)
    return [rest for _ in ctx.out]


@rule("namedtuple")
def namedtuple(ctx: RuleContext, node):
    """Building an output container: each field keeps its own label."""
    fields = list(node.target._fields)
    values = list(node.args) + [node.kwargs[f] for f in fields[len(node.args):] if f in node.kwargs]
    return [ctx.label(v) for v in values]
