"""Reshapes: view/reshape, reshape_as, flatten/unflatten, (un)squeeze, and head splits.

Merging a channel axis with unlabelled axes expands each channel into its block; splitting one
channel axis into several (C -> heads x head_dim) ties the elements so that only one of the new
axes stays prunable. Shape arguments are bound with :mod:`.sizes`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, cast

import numpy as np
import torch
from torch import fx, nn

from ..graph.labels import AxisLabel
from .context import RuleContext, norm_dim
from .registry import register_op, rule
from .sizes import bind_sizes, reads_shape_of, shape_args


def _axis_groups(in_shape: Sequence[int], out_shape: Sequence[int]):
    """Pair runs of input axes with runs of output axes of equal product (sizes > 1 only)."""
    # size-1 axes carry nothing and may appear or vanish anywhere; the caller freezes a labelled one first
    a = [i for i, s in enumerate(in_shape) if s != 1]
    b = [j for j, s in enumerate(out_shape) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        in_axes, out_axes = [a[i]], [b[j]]
        in_product, out_product = in_shape[a[i]], out_shape[b[j]]
        # grow whichever run has the smaller product until both cover the same elements: in row-major order
        # these runs are the smallest blocks that a reshape maps onto each other
        while in_product != out_product:
            if in_product < out_product:
                i += 1
                if i >= len(a):
                    return None
                in_axes.append(a[i])
                in_product *= in_shape[a[i]]
            else:
                j += 1
                if j >= len(b):
                    return None
                out_axes.append(b[j])
                out_product *= out_shape[b[j]]
        groups.append((in_axes, out_axes))
        i += 1
        j += 1
    if i != len(a) or j != len(b):
        return None
    return groups


def reshape_label(ctx: RuleContext, x, out_shape: Sequence[int], kinds: Optional[List[Optional[str]]] = None):
    """Labels after reshaping ``x`` to ``out_shape``.

    Merging a channel axis with unlabelled axes (flatten -> linear) expands each channel into its
    block. Splitting one channel axis into several (C -> heads x head_dim) is a *head split*: the
    split is kept prunable along one axis only, by tying the elements along the others. In
    ``"heads"`` mode the axis before the innermost one carries the label (whole heads go; q, k and v
    of a packed projection go together); in ``"head_dims"`` mode the innermost axis does (the same
    dims go in every head). ``kinds[j]`` receives ``"pass"``, ``"merge"``, ``"heads"`` or
    ``"head_dim"`` for every labelled output axis j.
    """
    meta, label = ctx.meta(x), ctx.tlabel(x)
    in_shape = meta.shape
    out: List[AxisLabel] = [None] * len(out_shape)
    kinds = kinds if kinds is not None else []
    kinds[:] = [None] * len(out_shape)
    for k, s in enumerate(in_shape):
        if s == 1 and label[k] is not None:
            # _axis_groups skips size-1 axes, so this label would otherwise vanish without a trace
            ctx.freeze(label[k], "reshape drops a labelled size-1 axis")
    groups = _axis_groups(in_shape, out_shape)
    if groups is None:
        ctx.freeze(label, "reshape with an unrecognised axis mapping")
        return (None,) * len(out_shape)
    for in_axes, out_axes in groups:
        labelled = [k for k in in_axes if label[k] is not None]
        if not labelled:
            continue
        if len(out_axes) == 1 and len(labelled) == 1:
            k = labelled[0]
            block = [in_shape[m] for m in in_axes]
            shape = [1] * len(in_axes)
            shape[in_axes.index(k)] = in_shape[k]
            # row-major merge: (C, H, W) -> C*H*W repeats channel c over its H*W consecutive positions
            out[out_axes[0]] = np.broadcast_to(label[k].reshape(shape), block).ravel()
            kinds[out_axes[0]] = "pass" if len(in_axes) == 1 else "merge"
        # undoing an earlier merge needs no tying: the labels already vary along one new axis only
        elif len(in_axes) == 1 and _unmerge(label[in_axes[0]], [out_shape[j] for j in out_axes]) is not None:
            k, axis = _unmerge(label[in_axes[0]], [out_shape[j] for j in out_axes])
            out[out_axes[k]] = axis
            kinds[out_axes[k]] = "pass"
        elif len(in_axes) == 1:
            sizes = [out_shape[j] for j in out_axes]
            # heads mode keeps the axis before the innermost: timm's (3, heads, head_dim) also ties a head's q, k, v
            keeper = len(out_axes) - 1 if ctx.attention == "head_dims" else len(out_axes) - 2
            axis = tie_split(ctx, label[in_axes[0]], sizes, keeper)
            out[out_axes[keeper]] = axis
            kinds[out_axes[keeper]] = "head_dim" if keeper == len(out_axes) - 1 else "heads"
            path = ctx.calling_path()
            inner = int(np.prod(sizes[keeper + 1:]))
            if keeper < len(out_axes) - 1:
                ctx.record_head_split(path, axis, inner)
            else:
                ctx.record_head_split(path, sizes[-2], axis)
        else:
            # several labelled axes in one run (an outer product flattened) would need joint labels, which we lack
            for k in labelled:
                ctx.freeze(label[k], "reshape splits and merges several channel axes at once")
    return tuple(out)


def _unmerge(axis: np.ndarray, sizes: Sequence[int]):
    """``(k, labels)`` when ``axis`` split into ``sizes`` varies along new axis k only: undoing an
    earlier merge (``(B*H, N, D) -> (B, H, N, D)``) where the labels already repeat, else None."""
    block = axis.reshape(sizes)
    for k in range(len(sizes)):
        columns = np.moveaxis(block, k, 0).reshape(sizes[k], -1)
        if sizes[k] > 1 and (columns == columns[:, :1]).all():
            return k, columns[:, 0].copy()
    return None


def tie_split(ctx: RuleContext, axis: np.ndarray, sizes: Sequence[int], keeper: int) -> np.ndarray:
    """Split ``axis`` into ``sizes`` and tie every element to the one at the same index of axis
    ``keeper`` and index 0 elsewhere; return the labels along ``keeper``."""
    # rows: indices along ``keeper``; columns: every combination of the other axes. Tying column 0 to all
    # others leaves one prunable element per keeper index
    block = np.moveaxis(axis.reshape(sizes), keeper, 0).reshape(sizes[keeper], -1)
    if block.shape[1] > 1:
        ctx.unify(np.repeat(block[:, :1], block.shape[1] - 1, axis=1).ravel(), block[:, 1:].ravel())
    return block[:, 0].copy()


@rule(".view", ".reshape", torch.reshape, "aten.view", "aten.reshape", "aten._unsafe_view")
def view(ctx: RuleContext, node):
    out = ctx.out
    entries = shape_args(ctx, node, 1)
    if entries and isinstance(entries[0], torch.dtype):  # view(dtype)
        ctx.freeze_inputs("view as another dtype")
        return ctx.unlabeled_output()
    if len(entries) == 1 and isinstance(entries[0], fx.Node) and not ctx.is_tensor(entries[0]):
        whole = entries[0]  # view(x.size()) or view(shape_node): each axis j reads whole[j]
        if isinstance(ctx.meta(whole), (tuple, list, torch.Size)) and reads_shape_of(whole):
            # ``view(x.size())``: output axis j has the size of x's axis j, so the two shrink together
            tensor = whole.args[0]
            labels = reshape_label(ctx, ctx.arg(0), out.shape)
            src = ctx.tlabel(tensor)
            for j, axis in enumerate(labels):
                if j < len(src) and (axis is not None or src[j] is not None):
                    ctx.unify(axis, src[j], out.shape[j])
            return labels
        # a computed shape tuple: bind_sizes then freezes every labelled axis it sizes and the sizes it reads
        entries = [whole] * out.ndim
    # a starred or otherwise unreadable shape: we cannot tell which entry sizes which axis
    if len(entries) != out.ndim:
        labels = reshape_label(ctx, ctx.arg(0), out.shape)
        ctx.freeze(labels, "reshape with an unrecognised size argument")
        return ctx.unlabeled_output()
    kinds: List[Optional[str]] = []
    labels = reshape_label(ctx, ctx.arg(0), out.shape, kinds)
    return bind_sizes(ctx, labels, out.shape, entries, kinds)


@rule(".reshape_as", ".view_as", "aten.reshape_as", "aten.view_as")
def reshape_as(ctx: RuleContext, node):
    """``x.reshape_as(other)``: the result's sizes are read from ``other``, so its axes shrink with them."""
    labels = list(reshape_label(ctx, ctx.arg(0), ctx.out.shape))
    other = ctx.tlabel(ctx.arg(1))
    for j, axis in enumerate(labels):
        if j < len(other) and (axis is not None or other[j] is not None):
            ctx.unify(axis, other[j], ctx.out.shape[j])
    return tuple(labels)


@rule(torch.flatten, ".flatten", "aten.flatten", nn.Flatten, ".unflatten", torch.unflatten, nn.Unflatten,
      "aten.unflatten", ".squeeze", torch.squeeze, "aten.squeeze", ".unsqueeze", torch.unsqueeze, "aten.unsqueeze")
def flatten(ctx: RuleContext, node):
    """Reshapes without a full size argument. Flatten: each channel expands into its block of
    trailing positions (flatten -> linear); (un)squeeze only adds or drops size-1 axes; unflatten's
    sizes are bound like a view's."""
    kinds: List[Optional[str]] = []
    labels = reshape_label(ctx, ctx.arg(0), ctx.out.shape, kinds)
    if "unflatten" not in str(node.target).lower() and not isinstance(ctx.modules.get(node.target), nn.Unflatten):
        return labels
    if node.op == "call_module":
        module = cast(nn.Unflatten, ctx.module)
        dim, sizes = module.dim, module.unflattened_size
    else:
        dim, sizes = ctx.arg(1, "dim"), ctx.arg(2, "sizes")
    if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)):
        ctx.freeze(labels, "unflatten with unrecognised sizes")
        return ctx.unlabeled_output()
    dim = norm_dim(dim, ctx.meta(ctx.arg(0)).ndim)
    # axes outside the unflattened range are unconstrained: -1 makes bind_sizes skip them
    entries = [-1] * dim + list(sizes) + [-1] * (ctx.out.ndim - dim - len(sizes))
    return bind_sizes(ctx, labels, ctx.out.shape, entries, kinds)


def flatten_shape(module: nn.Flatten, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, module.start_dim, module.end_dim)


register_op(nn.Flatten, shape=flatten_shape)
