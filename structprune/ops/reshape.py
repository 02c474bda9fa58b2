"""Layout ops: they move, merge, split, select or copy channel labels without mixing values.

Shape arguments that are literal integers are constants baked into the model's code: a channel axis
whose size such a constant fixes cannot shrink, so its channels are frozen. Sizes computed at run
time (``x.size(0)``, ``-1``) follow the pruned tensor and are fine.
"""
from __future__ import annotations

import builtins
import operator
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..surgery.size_attributes import HeadSplit, size_attributes
from ..graph.shapes import TensorMeta
from ..graph.labels import AxisLabel
from .context import RuleContext, norm_dim
from .registry import rule


# ---- reshape family --------------------------------------------------------------------------------------
def _axis_groups(in_shape: Sequence[int], out_shape: Sequence[int]):
    """Pair runs of input axes with runs of output axes of equal product (sizes > 1 only)."""
    a = [i for i, s in enumerate(in_shape) if s != 1]
    b = [j for j, s in enumerate(out_shape) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        gi, gj = [a[i]], [b[j]]
        pi, pj = in_shape[a[i]], out_shape[b[j]]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= len(a):
                    return None
                gi.append(a[i])
                pi *= in_shape[a[i]]
            else:
                j += 1
                if j >= len(b):
                    return None
                gj.append(b[j])
                pj *= out_shape[b[j]]
        groups.append((gi, gj))
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
            ctx.freeze(label[k], "reshape drops a labelled size-1 axis")
    groups = _axis_groups(in_shape, out_shape)
    if groups is None:
        ctx.freeze(label, "reshape with an unrecognised axis mapping")
        return (None,) * len(out_shape)
    for gi, gj in groups:
        labelled = [k for k in gi if label[k] is not None]
        if not labelled:
            continue
        if len(gj) == 1 and len(labelled) == 1:
            k = labelled[0]
            block = [in_shape[m] for m in gi]
            shape = [1] * len(gi)
            shape[gi.index(k)] = in_shape[k]
            out[gj[0]] = np.broadcast_to(label[k].reshape(shape), block).ravel()
            kinds[gj[0]] = "pass" if len(gi) == 1 else "merge"
        elif len(gi) == 1 and _unmerge(label[gi[0]], [out_shape[j] for j in gj]) is not None:
            k, axis = _unmerge(label[gi[0]], [out_shape[j] for j in gj])
            out[gj[k]] = axis
            kinds[gj[k]] = "pass"
        elif len(gi) == 1:
            sizes = [out_shape[j] for j in gj]
            keeper = len(gj) - 1 if ctx.state.attention == "head_dims" else len(gj) - 2
            axis = tie_split(ctx, label[gi[0]], sizes, keeper)
            out[gj[keeper]] = axis
            kinds[gj[keeper]] = "head_dim" if keeper == len(gj) - 1 else "heads"
            path = ctx.calling_path()
            inner = int(np.prod(sizes[keeper + 1:]))
            split = HeadSplit(path, axis, inner) if keeper < len(gj) - 1 else HeadSplit(path, sizes[-2], axis)
            ctx.state.head_splits.append(split)
        else:
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
    block = np.moveaxis(axis.reshape(sizes), keeper, 0).reshape(sizes[keeper], -1)
    if block.shape[1] > 1:
        ctx.unify(np.repeat(block[:, :1], block.shape[1] - 1, axis=1).ravel(), block[:, 1:].ravel())
    return block[:, 0].copy()


def _shape_args(ctx: RuleContext, node: fx.Node, first: int):
    """The target shape's entries, flattening ``view(a, b)`` and ``view((a, b))`` alike."""
    args = list(node.args[first:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return args


def _is_literal_size(entry) -> bool:
    return isinstance(entry, int) and entry != -1


def size_source(ctx: RuleContext, entry):
    """``(tensor node, axis)`` whose run-time size ``entry`` reads (``x.size(1)``, ``x.shape[1]``), else None."""
    if not isinstance(entry, fx.Node):
        return None
    if entry.op == "call_method" and entry.target == "size" and len(entry.args) == 2:
        tensor, axis = entry.args
        return (tensor, axis) if isinstance(axis, int) else None
    if entry.op == "call_function" and str(entry.target).startswith("aten.sym_size"):
        return entry.args[0], entry.args[1]
    if entry.op == "call_function" and entry.target is operator.getitem and isinstance(entry.args[1], int):
        whole = entry.args[0]
        if isinstance(whole, fx.Node) and (
                (whole.op == "call_function" and whole.target is builtins.getattr and whole.args[1] == "shape")
                or (whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1)):
            return whole.args[0], entry.args[1]
    return None


def _scaled_size_source(ctx: RuleContext, entry):
    """``(tensor, axis, factor)`` for a size computed as ``x.size(axis) * factor`` (``h * n_rep`` in
    LLaMA's ``repeat_kv``), else None."""
    if not (isinstance(entry, fx.Node) and entry.op == "call_function" and entry.target is operator.mul):
        return None
    a, b = entry.args
    for size, factor in ((a, b), (b, a)):
        source = size_source(ctx, size)
        if source is not None and isinstance(factor, int) and factor > 0:
            return source[0], source[1], factor
    return None


def _bind_scaled(ctx: RuleContext, axis: np.ndarray, tensor, dim: int, factor: int) -> bool:
    """Couple an axis of size ``x.size(dim) * factor`` with that axis of ``x``, if the axis is made of
    ``factor`` copies of one label per index (``repeat``, ``expand + reshape``) or ``factor`` copies of
    the whole label (``tile``): dropping one index of ``x`` then drops all its copies."""
    src_label = ctx.tlabel(tensor)
    src = src_label[norm_dim(dim, len(src_label))] if src_label else None
    n = len(axis) // factor
    if src is None or len(axis) != n * factor or len(src) != n:
        return False
    for copies in (axis.reshape(n, factor), axis.reshape(factor, n).T):
        if (copies == copies[:, :1]).all():
            ctx.unify(copies[:, 0], src, n)
            return True
    return False


_SIZE_ROLES = {"heads": ("heads",), "head_dim": ("head_dim",), "merge": ("heads", "attention_width"),
               "pass": ("heads", "head_dim", "attention_width", "ffn", "hidden"), "split": ("attention_width",)}


def adaptable_literal(ctx: RuleContext, literal: int, kind: Optional[str], axis: np.ndarray) -> bool:
    """Can a literal size of a channel axis follow pruning? Yes when it is the value of a size attribute
    (``num_heads``, ``config.num_key_value_heads``) of the module making the call: the attribute is
    rewritten after pruning. Under torch.export also when the axis passes through unchanged: export
    bakes shape reads such as ``x.size(-1)`` into literals."""
    module = ctx.calling_module()
    if module is not None and kind in _SIZE_ROLES:
        names = size_attributes(module, literal, _SIZE_ROLES[kind])
        for name in names:
            shared = name.startswith("config.")  # one config serves every layer; refreshed once, at the end
            if shared and ctx.exported:
                continue  # under export the literal may as well be a shape read: verification has the last word
            key = ("config", id(module.config), name) if shared else (ctx.calling_path(), name)
            sized = ctx.state.attribute_axes.setdefault(key, axis)
            if sized is axis:
                if not shared:
                    ctx.state.widths.append((key[0], name, axis))
            elif len(sized) == len(axis):  # one attribute sizes several axes (q, k and v; every layer)
                ctx.unify(sized, axis, len(axis))
            else:
                ctx.freeze(axis, f"{name} sizes axes of different lengths")
        if names:
            return True
    return ctx.exported and kind == "pass"


def bind_sizes(ctx: RuleContext, out: Sequence[AxisLabel], out_shape: Sequence[int], entries: Sequence,
               kinds: Optional[Sequence[Optional[str]]] = None) -> tuple:
    """Reconcile the output labels with the size arguments that produced them.

    A size read from another tensor's axis must shrink with that axis, so the two are unified.
    ``-1`` adapts. A literal that is a module's size attribute adapts (see :func:`adaptable_literal`).
    Any other literal or computed size pins its axis (frozen).
    """
    out = list(out)
    kinds = kinds if kinds is not None else ["pass"] * len(out)
    for j, entry in enumerate(entries):
        if entry == -1 and not isinstance(entry, fx.Node):
            continue
        source = size_source(ctx, entry)
        scaled = _scaled_size_source(ctx, entry) if source is None and out[j] is not None else None
        if scaled is not None and _bind_scaled(ctx, out[j], *scaled):
            continue
        if source is not None:
            tensor, axis = source
            src_label = ctx.tlabel(tensor)
            src_axis = src_label[norm_dim(axis, len(src_label))] if src_label else None
            if src_axis is not None or out[j] is not None:
                ctx.unify(out[j], src_axis, out_shape[j])
        elif out[j] is not None and _is_literal_size(entry) and adaptable_literal(ctx, entry, kinds[j], out[j]):
            continue
        elif out[j] is not None and (_is_literal_size(entry) or isinstance(entry, fx.Node)):
            ctx.freeze(out[j], "a channel axis sized by a constant in the model code")
            out[j] = None
        if source is None and scaled is None and isinstance(entry, fx.Node):
            for tensor, axis in _sizes_read(ctx, entry):
                src_label = ctx.tlabel(tensor)
                if src_label:
                    ctx.freeze(src_label[norm_dim(axis, len(src_label))],
                               "its size feeds a computed shape (e.g. C // num_heads)")
    return tuple(out)


def _sizes_read(ctx: RuleContext, entry: fx.Node, limit: int = 64) -> list:
    """Every ``(tensor, axis)`` whose size the computed value ``entry`` depends on."""
    found, stack, seen = [], [entry], set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen or ctx.is_tensor(node):
            continue
        seen.add(node)
        source = size_source(ctx, node)
        if source is not None:
            found.append(source)
        elif _reads_shape_of(node):
            meta = ctx.meta(node.args[0])
            found.extend((node.args[0], k) for k in range(getattr(meta, "ndim", 0)))
        else:
            stack.extend(a for a in node.all_input_nodes)
    return found


@rule(".view", ".reshape", torch.reshape, "aten.view", "aten.reshape", "aten._unsafe_view")
def view(ctx: RuleContext, node):
    out = ctx.out
    entries = _shape_args(ctx, node, 1)
    if entries and isinstance(entries[0], torch.dtype):  # view(dtype)
        ctx.freeze_inputs("view as another dtype")
        return ctx.unlabeled_output()
    if len(entries) == 1 and isinstance(entries[0], fx.Node) and not ctx.is_tensor(entries[0]):
        whole = entries[0]  # view(x.size()) or view(shape_node): each axis j reads whole[j]
        if isinstance(ctx.meta(whole), (tuple, list, torch.Size)) and _reads_shape_of(whole):
            tensor = whole.args[0]
            labels = reshape_label(ctx, ctx.arg(0), out.shape)
            src = ctx.tlabel(tensor)
            for j, axis in enumerate(labels):
                if j < len(src) and (axis is not None or src[j] is not None):
                    ctx.unify(axis, src[j], out.shape[j])
            return labels
        entries = [whole] * out.ndim
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


def _reads_shape_of(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is builtins.getattr and node.args[1] == "shape") or \
        (node.op == "call_method" and node.target == "size" and len(node.args) == 1)


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
        dim, sizes = ctx.module.dim, ctx.module.unflattened_size
    else:
        dim, sizes = ctx.arg(1, "dim"), ctx.arg(2, "sizes")
    if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)):
        ctx.freeze(labels, "unflatten with unrecognised sizes")
        return ctx.unlabeled_output()
    dim = norm_dim(dim, ctx.meta(ctx.arg(0)).ndim)
    entries = [-1] * dim + list(sizes) + [-1] * (ctx.out.ndim - dim - len(sizes))
    return bind_sizes(ctx, labels, ctx.out.shape, entries, kinds)


# ---- axis permutations ------------------------------------------------------------------------------------
@rule(".permute", torch.permute, "aten.permute")
def permute(ctx: RuleContext, node):
    label = ctx.tlabel(ctx.arg(0))
    if node.op == "call_method" and len(node.args) > 1:
        dims = _shape_args(ctx, node, 1)
    else:
        dims = list(ctx.arg(1, "dims"))
    return tuple(label[norm_dim(d, len(label))] for d in dims)


@rule(".transpose", torch.transpose, "aten.transpose", ".swapaxes", torch.swapaxes, ".swapdims", torch.swapdims)
def transpose(ctx: RuleContext, node):
    label = list(ctx.tlabel(ctx.arg(0)))
    first = ctx.arg(1, "dim0", node.kwargs.get("axis0"))
    second = ctx.arg(2, "dim1", node.kwargs.get("axis1"))
    a, b = norm_dim(first, len(label)), norm_dim(second, len(label))
    label[a], label[b] = label[b], label[a]
    return tuple(label)


@rule(".t", torch.t, "aten.t", "aten.numpy_T")
def matrix_transpose(ctx: RuleContext, node):
    """``x.t()`` and ``x.T``: every axis reversed."""
    return tuple(reversed(ctx.tlabel(ctx.arg(0))))


@rule("aten.mT", "aten.mH", "aten.adjoint")
def last_two_swapped(ctx: RuleContext, node):
    """``x.mT``: the last two axes swapped."""
    label = list(ctx.tlabel(ctx.arg(0)))
    label[-2:] = label[-2:][::-1]
    return tuple(label)


@rule(".movedim", torch.movedim, ".moveaxis", torch.moveaxis)
def movedim(ctx: RuleContext, node):
    label = ctx.tlabel(ctx.arg(0))
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [norm_dim(s, len(label)) for s in src]
    dst = [norm_dim(d, len(label)) for d in dst]
    rest = [k for k in range(len(label)) if k not in src]
    result: List[AxisLabel] = [None] * len(label)
    for s, d in zip(src, dst):
        result[d] = label[s]
    free = iter(rest)
    for k in range(len(label)):
        if k not in dst:
            result[k] = label[next(free)]
    return tuple(result)


# ---- joining and splitting -----------------------------------------------------------------------------
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
        if dynamic and len(set(sizes)) == 1 and len(sizes) > 1:
            pieces = axis.reshape(len(sizes), -1)
            for p in pieces[1:]:
                ctx.unify(pieces[0], p, len(p))
        elif len(sizes) > 1:
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
    module's size attribute (GPT-2's fused ``c_attn(x).split(self.split_size)``): the pieces are tied
    position by position and the attribute is rewritten after pruning."""
    x = ctx.arg(0)
    dim = norm_dim(ctx.arg(2, "dim", 0), ctx.meta(x).ndim)
    sizes = [m.shape[dim] for m in ctx.out]
    piece = ctx.arg(1, "split_size", node.kwargs.get("split_size_or_sections"))
    axis = ctx.tlabel(x)[dim]
    adaptable = (isinstance(piece, int) and axis is not None and len(sizes) > 1 and len(set(sizes)) == 1
                 and adaptable_literal(ctx, piece, "split", axis[:piece]))
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


# ---- indexing ----------------------------------------------------------------------------------------------
@rule(operator.getitem)
def getitem(ctx: RuleContext, node):
    container, index = ctx.arg(0), ctx.arg(1)
    meta = ctx.meta(container)
    label = ctx.label(container)
    if isinstance(meta, dict):
        keys = list(meta)
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
            if label[k] is not None and not full:
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


@rule(torch.gather, ".gather", "aten.gather", torch.take_along_dim, ".take_along_dim")
def gather(ctx: RuleContext, node):
    """``gather(x, dim, index)``: output axes other than ``dim`` pair index i of x with index i of
    ``index``; the gathered axis mixes positions, so a channel axis there is frozen."""
    x, index = ctx.arg(0), ctx.arg(2, "index")
    if "take_along_dim" in str(node.target):
        x, index, dim = ctx.arg(0), ctx.arg(1, "indices"), ctx.arg(2, "dim")
    else:
        dim = ctx.arg(1, "dim")
    lx, li = ctx.tlabel(x), ctx.tlabel(index)
    if dim is None or len(lx) != len(li) or len(lx) != ctx.out.ndim:
        ctx.freeze_inputs("gather with an unrecognised layout")
        return ctx.unlabeled_output()
    dim = norm_dim(dim, len(lx))
    out: List[AxisLabel] = []
    for k in range(len(lx)):
        size = ctx.out.shape[k]
        if k == dim or ctx.meta(x).shape[k] != size:
            ctx.freeze(lx[k], "gathered or partly read channel axis")
            out.append(li[k])
        else:
            out.append(ctx.unify_all([lx[k], li[k]], size))  # a fixed-size index cannot shrink
    return tuple(out)


@rule("aten.index")
def aten_index(ctx: RuleContext, node):
    """``x[idx]`` under torch.export: ``aten.index(x, [None, idx, ...])``. Axes indexed by a tensor are
    replaced by the index's axes (a channel axis there is frozen); the others keep their labels."""
    x, indices = ctx.arg(0), list(ctx.arg(1))
    label = list(ctx.tlabel(x))
    used = [k for k, i in enumerate(indices) if i is not None]
    if not used or used != list(range(used[0], used[-1] + 1)):
        ctx.freeze(tuple(label), "indexing with tensors on non-adjacent axes")
        return ctx.unlabeled_output()
    return _indexed_axes(ctx, label, used, [indices[k] for k in used])


def _tensor_index(ctx: RuleContext, label: list, items: list):
    """``x[..., idx, ...]`` with index tensors on adjacent axes and full slices elsewhere."""
    whole = lambda i: isinstance(i, slice) and i == slice(None)  # noqa: E731
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (len(label) - len(items) + 1) + items[at + 1:]
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
        ctx.freeze(ctx.label(index), "index tensor")
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
    if label[dim] is not None and ctx.out.shape[dim] != ctx.meta(x).shape[dim]:
        ctx.freeze(label[dim], "slicing a channel axis with constant bounds")
        label[dim] = None
    return tuple(label)


# ---- broadcasting copies -------------------------------------------------------------------------------
@rule(".expand", "aten.expand", ".broadcast_to", torch.broadcast_to)
def expand(ctx: RuleContext, node):
    x = ctx.arg(0)
    label, out = ctx.tlabel(x), ctx.out
    lead = out.ndim - len(label)
    result: List[AxisLabel] = [None] * lead
    for k, axis in enumerate(label):
        result.append(axis if out.shape[k + lead] == ctx.meta(x).shape[k] else None)
    entries = _shape_args(ctx, node, 1)
    if len(entries) != out.ndim:
        ctx.freeze(label, "expand with an unrecognised size argument")
        return ctx.unlabeled_output()
    return bind_sizes(ctx, result, out.shape, entries)


@rule(".expand_as")
def expand_as(ctx: RuleContext, node):
    x, other = ctx.arg(0), ctx.arg(1)
    label, target = ctx.tlabel(x), ctx.tlabel(other)
    lead = len(target) - len(label)
    result = list(target)
    for k, axis in enumerate(label):
        if ctx.meta(x).shape[k] == ctx.out.shape[k + lead]:
            result[k + lead] = ctx.unify_all([axis, target[k + lead]], ctx.out.shape[k + lead])
    return tuple(result)


@rule(torch.roll, ".roll", "aten.roll")
def roll(ctx: RuleContext, node):
    """Shifting along an axis reorders it: fine for spatial axes, frozen for channel axes."""
    label = list(ctx.tlabel(ctx.arg(0)))
    dims = ctx.arg(2, "dims")
    dims = range(len(label)) if dims is None or dims == [] else [dims] if isinstance(dims, int) else dims
    for d in dims:
        d = norm_dim(d, len(label))
        if label[d] is not None:
            ctx.freeze(label[d], "roll along a channel axis")
            label[d] = None
    return tuple(label)


@rule(".new_empty", ".new_zeros", ".new_ones", ".new_full", ".new_tensor", "aten.new_empty", "aten.new_zeros",
      "aten.new_ones", "aten.new_full")
def new_tensor(ctx: RuleContext, node):
    """``x.new_zeros(size)`` borrows only x's dtype and device: nothing to couple or freeze."""
    return ctx.unlabeled_output()


@rule(".repeat", "aten.repeat", torch.tile, ".tile")
def repeat(ctx: RuleContext, node):
    x = ctx.arg(0)
    label = ctx.tlabel(x)
    out = ctx.out
    lead = out.ndim - len(label)
    result: List[AxisLabel] = [None] * lead
    for k, axis in enumerate(label):
        times = out.shape[k + lead] // max(ctx.meta(x).shape[k], 1)
        result.append(None if axis is None else np.tile(axis, times))
    return tuple(result)


@rule(".repeat_interleave", torch.repeat_interleave, "aten.repeat_interleave")
def repeat_interleave(ctx: RuleContext, node):
    x = ctx.arg(0)
    label = list(ctx.tlabel(x))
    repeats, dim = ctx.arg(1, "repeats"), ctx.arg(2, "dim")
    if not isinstance(repeats, int) or dim is None:
        ctx.freeze(tuple(label), "repeat_interleave without a constant repeat count and dim")
        return ctx.unlabeled_output()
    dim = norm_dim(dim, len(label))
    if label[dim] is not None:
        label[dim] = np.repeat(label[dim], repeats)
    return tuple(label)


# ---- spatial ops: pooling, resizing, padding ----------------------------------------------------------------
def spatial(ctx: RuleContext, x, n_spatial: int):
    """An op that only works on the last ``n_spatial`` axes: other labels pass through."""
    label = list(ctx.tlabel(x))
    out = ctx.out
    if isinstance(out, (tuple, list)):  # pooling with return_indices
        out = out[0]
    if len(label) != out.ndim:
        ctx.freeze(tuple(label), "spatial op changed the rank")
        return ctx.unlabeled_output()
    for k in range(len(label) - n_spatial, len(label)):
        if label[k] is not None:
            ctx.freeze(label[k], "spatial op over a channel axis")
            label[k] = None
    for k in range(len(label) - n_spatial):
        if label[k] is not None and out.shape[k] != ctx.meta(x).shape[k]:
            ctx.freeze(label[k], "spatial op changed a channel axis")
            label[k] = None
    result = tuple(label)
    return [result, None] if isinstance(ctx.out, (tuple, list)) else result


_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2, nn.FractionalMaxPool2d: 2,
    nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3, nn.ConstantPad1d: 1, nn.ConstantPad2d: 2,
    nn.ConstantPad3d: 3, nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReflectionPad3d: 3,
    nn.ReplicationPad1d: 1, nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3, nn.CircularPad1d: 1,
    nn.CircularPad2d: 2, nn.CircularPad3d: 3,
}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
    "aten.max_pool1d": 1, "aten.max_pool2d": 2, "aten.max_pool3d": 3, "aten.avg_pool1d": 1,
    "aten.avg_pool2d": 2, "aten.avg_pool3d": 3, "aten.adaptive_avg_pool1d": 1, "aten.adaptive_avg_pool2d": 2,
    "aten.adaptive_avg_pool3d": 3, "aten.max_pool2d_with_indices": 2, "aten.max_pool3d_with_indices": 3,
    "aten.adaptive_max_pool2d": 2, "aten.adaptive_max_pool1d": 1, "aten._adaptive_avg_pool2d": 2,
}


@rule(*_POOL_MODULES)
def pool_module(ctx: RuleContext, node):
    m = ctx.module
    n = next(s for cls, s in _POOL_MODULES.items() if isinstance(m, cls))
    return spatial(ctx, ctx.arg(0, "input"), n)


def _fixed_spatial(n: int):
    return lambda ctx, node: spatial(ctx, ctx.arg(0, "input"), n)


for _target, _n in _POOL_FUNCTIONS.items():
    rule(_target)(_fixed_spatial(_n))


@rule(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, nn.Upsample, nn.UpsamplingNearest2d,
      nn.UpsamplingBilinear2d, "aten.upsample_nearest1d", "aten.upsample_nearest2d", "aten.upsample_nearest3d",
      "aten.upsample_bilinear2d", "aten.upsample_bicubic2d", "aten.upsample_linear1d", "aten.upsample_trilinear3d")
def resize(ctx: RuleContext, node):
    x = ctx.arg(0, "input")
    return spatial(ctx, x, max(ctx.meta(x).ndim - 2, 1))


@rule(F.pad, "aten.pad", "aten.constant_pad_nd", "aten.reflection_pad2d", "aten.replication_pad2d")
def pad(ctx: RuleContext, node):
    x = ctx.arg(0, "input")
    amounts = ctx.arg(1, "pad")
    n = len(amounts) // 2 if isinstance(amounts, (list, tuple)) else ctx.meta(x).ndim
    return spatial(ctx, x, n)


# ---- shape queries: no tensor comes out, nothing to freeze ------------------------------------------------
_TRANSPOSING_ATTRIBUTES = {"T": matrix_transpose, "mT": last_two_swapped, "mH": last_two_swapped,
                           "H": matrix_transpose}


@rule(".size", ".dim", ".numel", ".ndimension", ".nelement", ".get_device", ".is_contiguous", "aten.sym_size",
      "aten.size", "aten.dim", "aten.numel", "aten._assert_tensor_metadata", "aten._assert_scalar",
      "aten.sym_constrain_range_for_size", torch._assert, builtins.getattr, builtins.len, builtins.int,
      builtins.float)
def shape_query(ctx: RuleContext, node):
    if node.target is builtins.getattr and ctx.arg(1) in _TRANSPOSING_ATTRIBUTES:
        return _TRANSPOSING_ATTRIBUTES[ctx.arg(1)](ctx, node)
    out = ctx.out
    if isinstance(out, TensorMeta) or (isinstance(out, (list, tuple)) and any(isinstance(o, TensorMeta)
                                                                                 for o in out)):
        ctx.freeze_inputs("shape query returned a tensor")
        return ctx.unlabeled_output()
    if node.target is builtins.getattr and ctx.arg(1) not in ("shape", "dtype", "device", "ndim", "is_cuda",
                                                              "requires_grad", "layout"):
        ctx.freeze_inputs(f"attribute {ctx.arg(1)!r} read from a tensor")
    return None
