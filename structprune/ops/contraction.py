"""Contractions: ``matmul`` (and ``mm``/``bmm``/``@``), ``addmm`` and ``torch.einsum``.

A contraction multiplies operands and sums over shared indices. Its channel rules follow from one
observation: every index an operand shares with another (contracted or kept) must keep the *same*
positions in both, since ``sum_k a[.., k] * b[k, ..]`` pairs position k of one with position k of the
other; an index that only one operand carries flows into the output, where that operand is the
layer that originates it (the weight of ``x @ W`` or of ``einsum("bi,oi->bo", x, W)``).
Dropping a channel from every operand that carries it equals zeroing it there, which is what the
verifier checks, so these rules never make a group approximate.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx

from ..graph.labels import AxisLabel
from .context import RuleContext
from .registry import rule
from .width_values import freeze_width_normalised


@rule(torch.matmul, torch.mm, torch.bmm, "aten.matmul", "aten.mm", "aten.bmm", ".matmul", ".mm", ".bmm",
      operator.matmul)
def matmul(ctx: RuleContext, node):
    """(..., n, k) @ (..., k, m): k is contracted (both sides drop the same k), batch axes broadcast."""
    left, right = ctx.arg(0), ctx.arg(1)
    left_label, right_label = ctx.tlabel(left), ctx.tlabel(right)
    # a 1-d operand is promoted and its axis removed again: too rare to be worth its own bookkeeping
    if len(left_label) < 2 or len(right_label) < 2:
        ctx.freeze_inputs("matrix-vector product")
        return ctx.unlabeled_output()
    left_meta, right_meta = ctx.meta(left), ctx.meta(right)
    ctx.unify(left_label[-1], right_label[-2], left_meta.shape[-1])
    # RAFT's correlation volume divides by sqrt(k): then k stays whole (see width_values)
    contracted = left_label[-1] if left_label[-1] is not None else right_label[-2]
    freeze_width_normalised(ctx, contracted, left_meta.shape[-1])
    out_meta = ctx.out
    batch = []
    n_batch = out_meta.ndim - 2
    for i in range(n_batch):
        axes, size = [], out_meta.shape[i]
        for label, meta in ((left_label, left_meta), (right_label, right_meta)):
            j = i - (n_batch - (meta.ndim - 2))  # batch axes align from the right
            if j >= 0 and meta.shape[j] == size:
                axes.append(label[j])
            elif j >= 0 and label[j] is not None:
                ctx.freeze(label[j], "broadcast batch axis of a matmul")
        batch.append(ctx.unify_all(axes, size) if axes else None)
    out = tuple(batch) + (left_label[-2], right_label[-1])
    # the right operand's columns are new features (x @ W); in attention's q @ k^T they are key positions,
    # which carry no label, so nothing is marked there
    ctx.mark_producer(right_label[-1])
    return out


@rule(torch.addmm, "aten.addmm")
def addmm(ctx: RuleContext, node):
    """``bias + x @ W`` (Hugging Face's ``Conv1D``, used by GPT-2, stores W as (in, out))."""
    bias, left, right = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    left_label, right_label, bias_label = ctx.tlabel(left), ctx.tlabel(right), ctx.tlabel(bias)
    if len(left_label) != 2 or len(right_label) != 2:
        ctx.freeze_inputs("addmm of inputs that are not matrices")
        return ctx.unlabeled_output()
    ctx.unify(left_label[1], right_label[0], ctx.meta(left).shape[1])
    out_cols = right_label[1]
    # a (out,) or (1, out) bias is added to every row: it must lose the same output columns as W
    if bias_label and ctx.meta(bias).shape[-1] == ctx.out.shape[1]:
        out_cols = ctx.unify_all([out_cols, bias_label[-1]], ctx.out.shape[1])
    # the rows of a 2-d bias are batch/token positions, which are never pruned
    if bias_label and len(bias_label) == 2:
        ctx.freeze(bias_label[0], "addmm with a row-wise bias")
    ctx.mark_producer(out_cols)
    return (left_label[0], out_cols)


# ----- einsum -------------------------------------------------------------------------------------------
# An index of an einsum equation: a letter, or ("...", r) for the r-th ellipsis axis counted from the
# right (ellipsis axes of different operands broadcast against each other from the right).
Index = Union[str, Tuple[str, int]]


@dataclass
class Equation:
    operands: List[List[Index]]  # the index of every axis of every operand
    output: List[Index]  # the index of every output axis


def _letters(term: str, ndim: Optional[int]) -> List[Index]:
    """Indices of one term (``"b...ij"``); ``ndim`` (None for the output) sizes its ellipsis."""
    head, dots, tail = term.partition("...")
    if "." in head or "." in tail:
        raise ValueError(f"misplaced '.' in {term!r}")
    for char in head + tail:
        if not (char.isascii() and char.isalpha()):
            raise ValueError(f"{char!r} is not a subscript letter")
    if not dots:
        if ndim is not None and len(head) != ndim:
            raise ValueError(f"{term!r} names {len(head)} axes of a {ndim}-d operand")
        return list(head)
    n_ellipsis = 0 if ndim is None else ndim - len(head) - len(tail)
    if n_ellipsis < 0:
        raise ValueError(f"{term!r} names more axes than its {ndim}-d operand has")
    return list(head) + [("...", r) for r in range(n_ellipsis - 1, -1, -1)] + list(tail)


def parse_equation(equation: str, ndims: Sequence[int]) -> Equation:
    """Parse an einsum equation for operands of the given ranks, as ``torch.einsum`` reads it:
    spaces are ignored; without ``->`` the output is the ellipsis axes followed by the letters
    that occur exactly once, in sorted order; an ellipsis absent from an explicit output is summed."""
    text = "".join(equation.split())
    lhs, arrow, rhs = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise ValueError(f"{len(terms)} terms for {len(ndims)} operands")
    operands = [_letters(term, ndim) for term, ndim in zip(terms, ndims)]
    # ellipsis axes broadcast from the right, so the output has as many as the operand with the most
    n_ellipsis = max((sum(isinstance(i, tuple) for i in axes) for axes in operands), default=0)
    ellipsis = [("...", r) for r in range(n_ellipsis - 1, -1, -1)]
    if arrow:
        head, dots, tail = rhs.partition("...")
        output = _letters(head + tail, None)
        # _letters cannot size an output ellipsis: parse the letters alone, then put the ellipsis back where it was
        output = output[:len(head)] + (ellipsis if dots else []) + output[len(head):]
    else:
        counts: Dict[Index, int] = {}
        for axes in operands:
            for index in axes:
                counts[index] = counts.get(index, 0) + 1
        # torch's implicit output: ellipsis first, then the letters used once, in sorted (ASCII) order
        output = ellipsis + sorted(i for i, n in counts.items() if isinstance(i, str) and n == 1)
    if len(set(output)) != len(output):
        raise ValueError(f"an output subscript repeats in {equation!r}")
    return Equation(operands, output)


def _sublist_equation(args: Sequence) -> Tuple[str, list]:
    """``einsum(a, [0, 1], b, [1, 2], [0, 2])`` as ``("ab,bc->ac", [a, b])``: integers 0-25 are
    the letters A-Z and 26-51 a-z, as in ``torch.functional.einsum``."""
    def term(sublist) -> str:
        if not isinstance(sublist, (list, tuple)):
            raise ValueError("a sublist is not a list")
        chars = []
        for entry in sublist:
            if entry is Ellipsis:
                chars.append("...")
            elif isinstance(entry, int) and 0 <= entry < 52:
                chars.append(chr(ord("A") + entry) if entry < 26 else chr(ord("a") + entry - 26))
            else:
                raise ValueError(f"sublist entry {entry!r} is not an integer in [0, 52) or ...")
        return "".join(chars)

    operands = list(args[0::2])
    sublists = list(args[1::2])
    output = None
    if len(operands) > len(sublists):  # a trailing output sublist
        output = operands.pop()
    equation = ",".join(term(s) for s in sublists)
    if output is not None:
        equation += "->" + term(output)
    return equation, operands


def _einsum_call(ctx: RuleContext):
    """(equation, operands) of an einsum node in any of its forms, or a reason it is not understood."""
    first = ctx.arg(0, "equation")
    if isinstance(first, str):
        rest = list(ctx.node.args[1:])
        if "tensors" in ctx.node.kwargs:  # aten.einsum(equation, tensors=[...])
            rest = [ctx.node.kwargs["tensors"]]
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):  # einsum(eq, [a, b]) and aten.einsum
            rest = list(rest[0])
        return first, rest
    if isinstance(first, fx.Node) and not ctx.is_tensor(first):
        return None, "an equation computed at run time (not a constant string)"
    if isinstance(first, fx.Node):
        try:
            return _sublist_equation(ctx.node.args)
        except ValueError as error:
            return None, f"sublist format not understood ({error})"
    return None, f"an equation of type {type(first).__name__}"


@rule(torch.einsum, "aten.einsum")
def einsum(ctx: RuleContext, node):
    """``torch.einsum`` with any equation, in the fx form (operands as arguments or as one list, or
    the sublist format) and in torch.export's ``aten.einsum(equation, [operands])``.

    For every index: the operand axes carrying it at full size are unified, contracted or kept (an
    index repeated inside one operand, a diagonal, unifies those axes too); a size-1 axis broadcast
    against a larger one cannot lose positions and is frozen; the output axis takes the unified
    label. Ellipsis axes are indices of their own, broadcast from the right like matmul's batch
    axes. An output index carried by a single operand originates there (the ``o`` of
    ``"bi,oi->bo"``) and marks a producer; with three or more operands, so does an index contracted
    between exactly two of them (the hidden width of ``"bi,ij,jk->bk"``, as between two linears).
    """
    equation, operands = _einsum_call(ctx)
    if equation is None:
        ctx.freeze_inputs(f"einsum with {operands}")
        return ctx.unlabeled_output()
    if not operands or not all(ctx.is_tensor(x) for x in operands):
        ctx.freeze_inputs("einsum with an operand that is not a traced tensor")
        return ctx.unlabeled_output()
    metas = [ctx.meta(x) for x in operands]
    try:
        parsed = parse_equation(equation, [m.ndim for m in metas])
    except ValueError as error:
        ctx.freeze_inputs(f"einsum equation {equation!r} not understood ({error})")
        return ctx.unlabeled_output()
    if len(parsed.output) != ctx.out.ndim:
        ctx.freeze_inputs(f"einsum equation {equation!r} does not give the traced output rank")
        return ctx.unlabeled_output()

    # where each index occurs: (operand number, axis label, axis size)
    occurrences: Dict[Index, List[Tuple[int, AxisLabel, int]]] = {}
    for k, (axes, x, meta) in enumerate(zip(parsed.operands, operands, metas)):
        label = ctx.tlabel(x)
        for axis, index in enumerate(axes):
            occurrences.setdefault(index, []).append((k, label[axis], meta.shape[axis]))

    labels: Dict[Index, AxisLabel] = {}
    kept = set(parsed.output)
    for index, found in occurrences.items():
        # the largest size of an index is its true size; smaller ones (size 1) are broadcast
        size = max(n for _, _, n in found)
        full = [label for _, label, n in found if n == size]
        for _, axis_label, n in found:
            if n != size and axis_label is not None:  # broadcast: this axis has one position, not `size`
                ctx.freeze(axis_label, f"einsum subscript {_name(index)} broadcast from size {n} to {size}")
        labels[index] = ctx.unify_all(full, size)
        if index not in kept:  # a contracted index normalised by its width stays whole (see width_values)
            freeze_width_normalised(ctx, labels[index], size)

    out = tuple(labels[index] for index in parsed.output)
    for index, found in occurrences.items():
        carriers = {k for k, _, _ in found}
        # a single-operand einsum (a transpose, a trace, a sum) only moves axes: it originates nothing
        originates = len(operands) >= 2 and len(carriers) == 1 and index in kept
        hidden = len(operands) >= 3 and len(carriers) == 2 and index not in kept
        if originates or hidden:
            ctx.mark_producer(labels[index])
    return out


def _name(index: Index) -> str:
    return index if isinstance(index, str) else f"'...' axis {index[1]} from the right"
