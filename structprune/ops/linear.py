"""Contractions over the last axis: Linear, Embedding, matmul."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.labels import AxisLabel
from .context import RuleContext
from .registry import rule


def linear(ctx: RuleContext, x, w_out: AxisLabel, w_in: AxisLabel, bias: AxisLabel):
    """y = x @ W^T + b: x's last axis is consumed by W's dim 1; y's last axis is W's dim 0."""
    x_label = ctx.tlabel(x)
    if not x_label:
        ctx.freeze_inputs("linear on a 0-d input")
        return ctx.unlabeled_output()
    ctx.unify(x_label[-1], w_in, ctx.meta(x).shape[-1])
    ctx.attach(bias, w_out)
    ctx.state.mark_producer(w_out)
    return tuple(x_label[:-1]) + (w_out,)


@rule(nn.Linear)
def linear_module(ctx: RuleContext, node):
    return linear(ctx, ctx.arg(0, "input"), ctx.module_param("weight", 0), ctx.module_param("weight", 1),
                  ctx.module_param("bias", 0))


@rule(F.linear, "aten.linear")
def linear_function(ctx: RuleContext, node):
    w = ctx.tlabel(ctx.arg(1, "weight"))
    b = ctx.tlabel(ctx.arg(2, "bias"))
    if len(w) != 2:
        ctx.freeze_inputs("linear with a weight that is not 2-D")
        return ctx.unlabeled_output()
    return linear(ctx, ctx.arg(0, "input"), w[0], w[1], b[0] if b else None)


def embedding(ctx: RuleContext, indices, w_rows: AxisLabel, w_cols: AxisLabel):
    ctx.freeze(ctx.label(indices), "indices fed to an embedding")
    ctx.freeze(w_rows, "vocabulary axis of an embedding")
    ctx.state.mark_producer(w_cols)
    return (None,) * ctx.meta(indices).ndim + (w_cols,)


@rule(nn.Embedding)
def embedding_module(ctx: RuleContext, node):
    return embedding(ctx, ctx.arg(0, "input"), ctx.module_param("weight", 0), ctx.module_param("weight", 1))


@rule(F.embedding)
def embedding_function(ctx: RuleContext, node):
    w = ctx.tlabel(ctx.arg(1, "weight"))
    return embedding(ctx, ctx.arg(0, "input"), w[0], w[1])


@rule("aten.embedding")
def embedding_aten(ctx: RuleContext, node):  # aten.embedding(weight, indices, ...)
    w = ctx.tlabel(ctx.arg(0))
    return embedding(ctx, ctx.arg(1), w[0], w[1])


@rule(torch.matmul, torch.mm, torch.bmm, "aten.matmul", "aten.mm", "aten.bmm", ".matmul", ".mm", ".bmm",
      operator.matmul)
def matmul(ctx: RuleContext, node):
    """(..., n, k) @ (..., k, m): k is contracted (both sides drop the same k), batch axes broadcast."""
    a, b = ctx.arg(0), ctx.arg(1)
    la, lb = ctx.tlabel(a), ctx.tlabel(b)
    if len(la) < 2 or len(lb) < 2:
        ctx.freeze_inputs("matrix-vector product")
        return ctx.unlabeled_output()
    ma, mb = ctx.meta(a), ctx.meta(b)
    ctx.unify(la[-1], lb[-2], ma.shape[-1])
    out_meta = ctx.out
    batch = []
    n_batch = out_meta.ndim - 2
    for i in range(n_batch):
        axes, size = [], out_meta.shape[i]
        for lab, meta in ((la, ma), (lb, mb)):
            j = i - (n_batch - (meta.ndim - 2))
            if j >= 0 and meta.shape[j] == size:
                axes.append(lab[j])
            elif j >= 0 and lab[j] is not None:
                ctx.freeze(lab[j], "broadcast batch axis of a matmul")
        batch.append(ctx.unify_all(axes, size) if axes else None)
    out = tuple(batch) + (la[-2], lb[-1])
    ctx.state.mark_producer(lb[-1])
    return out


@rule(torch.addmm, "aten.addmm")
def addmm(ctx: RuleContext, node):
    """``bias + x @ W`` (Hugging Face's ``Conv1D``, used by GPT-2, stores W as (in, out))."""
    bias, a, b = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    la, lb, lbias = ctx.tlabel(a), ctx.tlabel(b), ctx.tlabel(bias)
    if len(la) != 2 or len(lb) != 2:
        ctx.freeze_inputs("addmm of inputs that are not matrices")
        return ctx.unlabeled_output()
    ctx.unify(la[1], lb[0], ctx.meta(a).shape[1])
    out_cols = lb[1]
    if lbias and ctx.meta(bias).shape[-1] == ctx.out.shape[1]:
        out_cols = ctx.unify_all([out_cols, lbias[-1]], ctx.out.shape[1])
    if lbias and len(lbias) == 2:
        ctx.freeze(lbias[0], "addmm with a row-wise bias")
    ctx.state.mark_producer(out_cols)
    return (la[0], out_cols)
