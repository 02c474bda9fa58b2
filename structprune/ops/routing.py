"""Mixture-of-experts routing: the router's ``topk`` and the experts' grouped matrix products.

A router scores every expert for every token (a linear layer whose output features are experts) and
keeps the ``k`` best with ``topk``. The axis ``topk`` selects over stops being channels: its outputs
are the k winners, so that axis is frozen (taking an expert away changes which ones win: removing
whole experts is a structure of its own); the other axes (tokens) pass through to the values and
the indices alike.

The experts' weights are one 3-D tensor, ``(experts, in, out)``, and a grouped matrix product
(``torch._grouped_mm``, or transformers' ``grouped_mm_fallback`` where that kernel is missing)
multiplies each token row by the weight of the expert it was routed to. Its channel rules are a
matmul's, shared by every expert: ``in`` is contracted (the tokens' features and every expert's
weight drop the same channels), ``out`` is new features that every expert's weight produces, so an
expert feed-forward width keeps one size across the experts of a layer, the width the config's
``moe_intermediate_size`` describes. The experts axis is frozen here, like the router's.
"""
from __future__ import annotations

import torch

from ..graph.shapes import TensorMeta
from .context import RuleContext, norm_dim
from .registry import rule


@rule(torch.topk, ".topk", "aten.topk")
def topk(ctx: RuleContext, node):
    x = ctx.arg(0)
    meta = ctx.meta(x)
    if not isinstance(meta, TensorMeta):
        return ctx.unlabeled_output()
    label = ctx.tlabel(x)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    if not isinstance(dim, int):
        ctx.freeze(label, "top-k over a dim that is not a constant")
        return ctx.unlabeled_output()
    axis = norm_dim(dim, meta.ndim)
    ctx.freeze(label[axis], "top-k selects positions along it (the experts a router picks)")
    kept = tuple(None if i == axis else label[i] for i in range(meta.ndim))
    return [kept, kept]


@rule("aten._grouped_mm", "transformers::grouped_mm_fallback")
def grouped_mm(ctx: RuleContext, node):
    """``(tokens, in) x (experts, in, out) -> (tokens, out)``, each token row by its expert's matrix."""
    x, weight = ctx.arg(0), ctx.arg(1)
    x_label, w_label = ctx.tlabel(x), ctx.tlabel(weight)
    if len(x_label) != 2 or len(w_label) != 3:
        ctx.freeze_inputs("a grouped matmul of other than (tokens, in) and (experts, in, out) operands")
        return ctx.unlabeled_output()
    ctx.unify(x_label[1], w_label[1], ctx.meta(x).shape[1])
    ctx.freeze(w_label[0], "the experts axis of a grouped matmul")
    ctx.mark_producer(w_label[2])
    return (x_label[0], w_label[2])
