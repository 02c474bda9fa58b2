"""Indexing: ``x[...]`` (getitem), gather/take_along_dim, ``aten.index``, select and ``aten.slice``.

Full slices and ``None``/``...`` keep labels; constant bounds, integers and index tensors on a
channel axis freeze it (they name positions that pruning would move). One slice is an exception:
the first or second *half* of an axis, with bounds read from its size (``x[..., : x.shape[-1] // 2]``,
the ``rotate_half`` of rotary position embeddings). Channel ``i`` then pairs with ``i + n/2``: they
are pruned together, so the halves stay halves and each half keeps its labels.
"""
from __future__ import annotations

import operator
from typing import List

import torch
from torch import fx

from ..graph.labels import AxisLabel
from ..graph.shapes import TensorMeta
from .context import RuleContext, norm_dim
from .registry import rule


@rule(operator.getitem)
def getitem(ctx: RuleContext, node):
    container, index = ctx.arg(0), ctx.arg(1)
    meta = ctx.meta(container)
    label = ctx.label(container)
    if isinstance(meta, dict):
        keys = list(meta)
        # a dict output (a Hugging Face ModelOutput) is labelled as a list in the dict's key order
        return label[keys.index(index)] if isinstance(label, list) and index in keys else ctx.unlabeled_output()
    if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size):
        if not isinstance(label, list):
            return ctx.unlabeled_output()
        picked = label[index]
        return picked if isinstance(index, int) else list(picked)
    if not isinstance(meta, TensorMeta):
        return None  # indexing a shape or another Python value
    return _index_tensor(ctx, container, index)


def _index_tensor(ctx: RuleContext, x, index):
    label = list(ctx.tlabel(x))
    meta = ctx.meta(x)
    items = list(index) if isinstance(index, tuple) else [index]
    # a node whose value is an int (``x[:, n - 1]`` with n computed) is an integer index, not advanced indexing
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) and not isinstance(ctx.meta(i), int) for i in items):
        return _tensor_index(ctx, label, items)
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    out: List[AxisLabel] = []
    k = 0
    for item in items:
        if item is Ellipsis:
            for _ in range(meta.ndim - n_real):
                out.append(label[k])
                k += 1
        elif item is None:
            out.append(None)
        elif isinstance(item, slice):
            full = item.start in (None, 0) and item.stop is None and item.step in (None, 1)
            half = None if full or label[k] is None else _half(ctx, label[k], meta.shape[k], item.start,
                                                                item.stop, item.step)
            if half is not None:
                out.append(half)
            elif label[k] is not None and not full:
                ctx.freeze(label[k], "slicing a channel axis with constant bounds")
                out.append(None)
            else:
                out.append(label[k])
            k += 1
        else:  # an integer (literal or computed): the axis disappears
            if label[k] is not None:
                ctx.freeze(label[k], "integer indexing of a channel axis")
            k += 1
    out.extend(label[k:])
    if len(out) != ctx.out.ndim:
        ctx.freeze(tuple(label), "indexing with an unrecognised pattern")
        return ctx.unlabeled_output()
    return tuple(out)


def _value(ctx: RuleContext, bound):
    """A slice bound as ``(int or None, read from a size?)``: a node computed in the graph is a size read;
    under torch.export, which bakes size reads into literals, a literal counts as one too."""
    if isinstance(bound, fx.Node):
        value = ctx.meta(bound)
        return (value, True) if isinstance(value, int) else (bound, False)
    return bound, ctx.exported


def _half(ctx: RuleContext, axis: AxisLabel, size: int, start, stop, step) -> AxisLabel:
    """The labels of ``axis[start:stop:step]`` when that is exactly its first or second half, with
    bounds read from its size; channel ``i`` is then paired with ``i + size/2`` (None: not a half)."""
    (start, start_read), (stop, stop_read), (step, _) = _value(ctx, start), _value(ctx, stop), _value(ctx, step)
    if axis is None or step not in (None, 1) or size % 2 or size < 2:
        return None
    half = size // 2
    first = start in (None, 0) and stop == half and stop_read
    # export writes an open end as INT64_MAX
    second = start == half and start_read and (stop is None or (isinstance(stop, int) and stop >= size))
    if not (first or second):
        return None
    ctx.unify(axis[:half], axis[half:], half)
    return axis[:half] if first else axis[half:]


@rule(torch.gather, ".gather", "aten.gather", torch.take_along_dim, ".take_along_dim")
def gather(ctx: RuleContext, node):
    """``gather(x, dim, index)``: output axes other than ``dim`` pair index i of x with index i of
    ``index``; the gathered axis mixes positions, so a channel axis there is frozen."""
    x, index = ctx.arg(0), ctx.arg(2, "index")
    if "take_along_dim" in str(node.target):
        x, index, dim = ctx.arg(0), ctx.arg(1, "indices"), ctx.arg(2, "dim")
    else:
        dim = ctx.arg(1, "dim")
    x_label, index_label = ctx.tlabel(x), ctx.tlabel(index)
    if dim is None or len(x_label) != len(index_label) or len(x_label) != ctx.out.ndim:
        ctx.freeze_inputs("gather with an unrecognised layout")
        return ctx.unlabeled_output()
    dim = norm_dim(dim, len(x_label))
    out: List[AxisLabel] = []
    for k in range(len(x_label)):
        size = ctx.out.shape[k]
        # along ``dim`` the index's values pick positions; on other axes a smaller index reads part of x only
        if k == dim or ctx.meta(x).shape[k] != size:
            ctx.freeze(x_label[k], "gathered or partly read channel axis")
            out.append(index_label[k])
        else:
            out.append(ctx.unify_all([x_label[k], index_label[k]], size))  # a fixed-size index cannot shrink
    return tuple(out)


@rule("aten.index")
def aten_index(ctx: RuleContext, node):
    """``x[idx]`` under torch.export: ``aten.index(x, [None, idx, ...])``. Axes indexed by a tensor are
    replaced by the index's axes (a channel axis there is frozen); the others keep their labels."""
    x, indices = ctx.arg(0), list(ctx.arg(1))
    label = list(ctx.tlabel(x))
    used = [k for k, i in enumerate(indices) if i is not None]
    # non-adjacent index tensors move the indexed axes to the front (numpy rules): a layout we do not model
    if not used or used != list(range(used[0], used[-1] + 1)):
        ctx.freeze(tuple(label), "indexing with tensors on non-adjacent axes")
        return ctx.unlabeled_output()
    return _indexed_axes(ctx, label, used, [indices[k] for k in used])


def _tensor_index(ctx: RuleContext, label: list, items: list):
    """``x[..., idx, ...]`` with index tensors on adjacent axes and full slices elsewhere."""
    whole = lambda i: isinstance(i, slice) and i == slice(None)  # noqa: E731
    if Ellipsis in items:
        ellipsis_at = items.index(Ellipsis)
        items = items[:ellipsis_at] + [slice(None)] * (len(label) - len(items) + 1) + items[ellipsis_at + 1:]
    items = items + [slice(None)] * (len(label) - len(items))
    picked = [k for k, i in enumerate(items) if not whole(i)]
    if len(items) != len(label) or picked != list(range(picked[0], picked[-1] + 1)) or \
            not all(isinstance(items[k], fx.Node) and ctx.is_tensor(items[k]) for k in picked):
        ctx.freeze(tuple(label), "advanced (tensor) indexing with an unrecognised pattern")
        return ctx.unlabeled_output()
    return _indexed_axes(ctx, label, picked, [items[k] for k in picked])


def _indexed_axes(ctx: RuleContext, label: list, picked: List[int], indices: list):
    """Labels after indexing axes ``picked`` (adjacent) with tensors: they are replaced by the
    indices' broadcast axes; a channel axis indexed this way is frozen."""
    last = picked[-1]
    for k, index in zip(picked, indices):
        meta = ctx.meta(index)
        consumed = meta.ndim if getattr(meta, "dtype", None) == torch.bool else 1  # a mask covers ndim axes
        for axis in label[k:k + consumed]:
            ctx.freeze(axis, "indexing a channel axis with a tensor")
        last = max(last, k + consumed - 1)
        # the index tensor's values are positions: its own channels cannot shrink without changing them
        ctx.freeze(ctx.label(index), "index tensor")
    # the indexed run is replaced by the indices' broadcast shape: its rank is what the output has left over
    n_index = ctx.out.ndim - (len(label) - (last - picked[0] + 1))
    if n_index < 0:
        ctx.freeze(tuple(label), "tensor indexing with an unrecognised result")
        return ctx.unlabeled_output()
    return tuple(label[:picked[0]] + [None] * n_index + label[last + 1:])


@rule(torch.select, ".select", "aten.select")
def select(ctx: RuleContext, node):  # select(x, dim, index): the axis disappears
    label = list(ctx.tlabel(ctx.arg(0)))
    dim = norm_dim(ctx.arg(1, "dim"), len(label))
    ctx.freeze(label[dim], "selecting one channel")
    return tuple(label[:dim] + label[dim + 1:])


@rule("aten.slice")
def aten_slice(ctx: RuleContext, node):  # aten.slice(x, dim, start, end, step)
    x = ctx.arg(0)
    label = list(ctx.tlabel(x))
    dim = norm_dim(ctx.arg(1, "dim", 0), len(label))
    # export's bounds may be symbolic or INT64_MAX: compare sizes instead, an unchanged size takes every position
    size = ctx.meta(x).shape[dim]
    half = None if label[dim] is None or ctx.out.shape[dim] == size else _half(
        ctx, label[dim], size, ctx.arg(2, "start"), ctx.arg(3, "end"), ctx.arg(4, "step"))
    if half is not None:
        label[dim] = half
    elif label[dim] is not None and ctx.out.shape[dim] != size:
        ctx.freeze(label[dim], "slicing a channel axis with constant bounds")
        label[dim] = None
    return tuple(label)
