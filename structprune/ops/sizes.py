"""Sizes in shape arguments: which tensor axis a size reads, and whether a literal may follow pruning.

A size read at run time (``x.size(1)``, ``x.shape[1]``) shrinks with the axis it reads, so the two
are unified. ``-1`` adapts. A literal integer is a constant baked into the model's code: the axis it
sizes cannot shrink, unless it is a module's size attribute (``num_heads``) that is rewritten after
pruning. Used by view/reshape, expand, unflatten and split.
"""
from __future__ import annotations

import builtins
import operator
from typing import Any, List, Optional, Sequence, Set, Tuple, cast

import numpy as np
from torch import fx

from ..graph.labels import AxisLabel
from .context import RuleContext, norm_dim
from .size_names import size_attributes


def shape_args(ctx: RuleContext, node: fx.Node, first: int):
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
    # torch.export with dynamic shapes records a shape read as ``aten.sym_size.int(x, dim)``
    if entry.op == "call_function" and str(entry.target).startswith("aten.sym_size"):
        return entry.args[0], entry.args[1]
    # fx traces ``x.shape[1]`` and ``x.size()[1]`` as getitem on getattr(x, "shape") / size() with no dim
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
    # rows of (n, factor) constant: each index repeated in place (repeat_interleave, GQA's expand + reshape);
    # rows of (factor, n).T constant: the whole label repeated end to end (tile, repeat)
    for copies in (axis.reshape(n, factor), axis.reshape(factor, n).T):
        if (copies == copies[:, :1]).all():
            ctx.unify(copies[:, 0], src, n)
            return True
    return False


def _per_head_size_source(ctx: RuleContext, entry):
    """``(tensor, axis, n)`` for a size computed as ``x.size(axis) // n`` with a literal ``n`` (XCiT's
    ``C // self.num_heads``, ``self.num_heads`` baked into the graph as its value), else None."""
    if not (isinstance(entry, fx.Node) and entry.op == "call_function" and entry.target is operator.floordiv):
        return None
    size, n = entry.args
    source = size_source(ctx, size)
    if source is None or not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    return source[0], source[1], n


def _bind_per_head(ctx: RuleContext, out: Sequence[AxisLabel], out_shape: Sequence[int], j: int,
                   tensor, dim: int, n: int) -> bool:
    """Couple the width ``C`` of ``C // n`` sizing head-dim axis ``j`` (after an axis of ``n`` heads) with
    that (heads, head_dim) pair: the value stays the head size exactly when ``C`` keeps ``heads * head_dim``
    channels, so channel i of ``C`` goes with element i of the pair merged (head ``i // head_dim`` when
    whole heads go, dim ``i % head_dim`` of every head when head dims go). As the closing
    ``reshape(B, N, C)`` of such attention couples them anyway, this ties nothing new there."""
    if j < 1 or out_shape[j - 1] != n or (out[j - 1] is None) == (out[j] is None):
        return False
    src_label = ctx.tlabel(tensor)
    src = src_label[norm_dim(dim, len(src_label))] if src_label else None
    head_dim = out_shape[j]
    if src is not None and len(src) != n * head_dim:
        return False
    heads, dims = out[j - 1], out[j]
    merged = np.repeat(heads, head_dim) if heads is not None else np.tile(cast(np.ndarray, dims), n)
    ctx.unify(src, merged, n * head_dim)  # an unlabelled C cannot shrink: the unify then freezes the heads
    return True


# which roles a literal may play, by what reshape_label did to its axis (``kinds``): attributes match by
# value, so narrow roles keep a coincidence (hidden == 64 == head_dim) from adapting the wrong attribute
_SIZE_ROLES = {"heads": ("heads",), "head_dim": ("head_dim",), "merge": ("heads", "attention_width"),
               "pass": ("heads", "head_dim", "attention_width", "ffn", "hidden"), "split": ("attention_width",),
               "split_total": ("split_total",)}


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
            sized = ctx.bind_attribute(key, axis)
            # the first axis bound to an attribute decides its new value; every later one must shrink alike
            if sized is axis:
                if not shared:
                    ctx.record_width(key[0], name, axis)
            elif len(sized) == len(axis):  # one attribute sizes several axes (q, k and v; every layer)
                ctx.unify(sized, axis, len(axis))
            else:
                ctx.freeze(axis, f"{name} sizes axes of different lengths")
        if names:
            return True
    # under export a pass-through literal is most likely a baked shape read; the dry run catches true constants
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
        out_axis = out[j]
        # ``x.size(1) * n_rep`` is tried before the generic computed-size freeze below, which would pin LLaMA's k/v
        scaled = None
        if source is None and out_axis is not None:
            scaled = _scaled_size_source(ctx, entry)
            if scaled is not None and _bind_scaled(ctx, out_axis, *scaled):
                continue
        # ``C // num_heads`` sizing the head dim: C must shrink by whole heads (or by the same dims of each head)
        per_head = _per_head_size_source(ctx, entry) if source is None else None
        if per_head is not None and _bind_per_head(ctx, out, out_shape, j, *per_head):
            continue
        if source is not None:
            tensor, axis = source
            src_label = ctx.tlabel(tensor)
            src_axis = src_label[norm_dim(axis, len(src_label))] if src_label else None
            # also when one side is unlabelled: a size read from an axis that cannot shrink pins (freezes) this one
            if src_axis is not None or out_axis is not None:
                ctx.unify(out_axis, src_axis, out_shape[j])
        elif out_axis is not None and _is_literal_size(entry) and adaptable_literal(ctx, entry, kinds[j], out_axis):
            continue
        elif out_axis is not None and (_is_literal_size(entry) or isinstance(entry, fx.Node)):
            ctx.freeze(out_axis, "a channel axis sized by a constant in the model code")
            out[j] = None
        # a computed size (``C // num_heads``) also pins every axis it reads: pruning C would change the
        # computed value in a way no label can follow
        if source is None and scaled is None and isinstance(entry, fx.Node):
            for tensor, axis in sizes_read(ctx, entry):
                src_label = ctx.tlabel(tensor)
                if src_label:
                    ctx.freeze(src_label[norm_dim(axis, len(src_label))],
                               "its size feeds a computed shape (e.g. C // num_heads)")
    return tuple(out)


def sizes_read(ctx: RuleContext, entry: fx.Node, limit: int = 64) -> list:
    """Every ``(tensor, axis)`` whose size the computed value ``entry`` depends on."""
    found: List[Tuple[Any, int]] = []
    stack: List[fx.Node] = [entry]
    seen: Set[fx.Node] = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        # stop at tensors: a size computed from tensor values is data, not a shape read
        if not isinstance(node, fx.Node) or node in seen or ctx.is_tensor(node):
            continue
        seen.add(node)
        source = size_source(ctx, node)
        if source is not None:
            found.append(source)
        elif reads_shape_of(node):
            meta = ctx.meta(node.args[0])
            found.extend((node.args[0], k) for k in range(getattr(meta, "ndim", 0)))
        else:
            stack.extend(a for a in node.all_input_nodes)
    return found


def reads_shape_of(node: fx.Node) -> bool:
    return bool(node.op == "call_function" and node.target is builtins.getattr and node.args[1] == "shape") or \
        (node.op == "call_method" and node.target == "size" and len(node.args) == 1)
