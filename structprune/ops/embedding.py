"""Embeddings: a lookup table whose rows are the vocabulary and whose columns are the channels.

The vocabulary axis is frozen (the indices address it); the embedding width originates channels
like a layer's output, so everything that reads the embedded tokens follows its columns.
"""
from __future__ import annotations

from typing import Dict

import torch.nn.functional as F
from torch import nn

from ..graph.labels import AxisLabel
from .context import RuleContext
from .registry import register_op, rule


def embedding(ctx: RuleContext, indices, w_rows: AxisLabel, w_cols: AxisLabel):
    """Each index becomes one row of the table: the output adds the table's columns as its last axis."""
    ctx.freeze(ctx.label(indices), "indices fed to an embedding")
    # the rows are addressed by token ids: dropping one would renumber every id after it
    ctx.freeze(w_rows, "vocabulary axis of an embedding")
    ctx.mark_producer(w_cols)
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


def update_embedding(module: nn.Embedding, old: Dict[str, tuple]) -> None:
    module.num_embeddings, module.embedding_dim = module.weight.shape


register_op(nn.Embedding, update=update_embedding, width="embedding_dim")
