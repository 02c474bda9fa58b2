"""Attention: ``scaled_dot_product_attention`` and ``nn.MultiheadAttention``.

Explicit attention (``softmax(q @ k.transpose(-2, -1) * scale) @ v``) needs no rule of its own: the
head split (see ``reshape.reshape_label``), matmul's batch axes and the softmax over key positions
already couple q, k, v and the output projection head by head.
"""
from __future__ import annotations

import operator
from typing import Dict, List

import numpy as np
import torch.nn.functional as F
from torch import nn

from ..graph.labels import AxisLabel
from .context import RuleContext, unlabeled
from .registry import register_op, rule
from .reshape import tie_split


def _grouped(ctx: RuleContext, q_axis: AxisLabel, kv_axis: AxisLabel, n_q: int, n_kv: int) -> None:
    """Grouped-query attention: query head h reads key/value head h // (n_q // n_kv)."""
    if q_axis is None and kv_axis is None:
        return
    if n_q % n_kv:
        ctx.freeze(q_axis, "query heads not a multiple of key/value heads")
        ctx.freeze(kv_axis, "query heads not a multiple of key/value heads")
        return
    # repeat gives every query head the label of the kv head it reads; unifying then ties each kv head to its
    # n_rep query heads, so a kv head can only go together with its whole query group
    expanded = None if kv_axis is None else np.repeat(kv_axis, n_q // n_kv)
    ctx.unify(q_axis, expanded, n_q)


@rule(F.scaled_dot_product_attention, "aten.scaled_dot_product_attention")
def scaled_dot_product_attention(ctx: RuleContext, node):
    """q (..., H, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev) -> (..., H, L, Ev).

    q and k contract over E (they drop the same dims); batch and head axes of q, k, v and the mask
    are coupled; with ``enable_gqa`` query head h reads key/value head h // (H // Hk). Without an
    explicit ``scale`` the softmax temperature is 1/sqrt(E): pruning E would change it, so E is frozen.
    """
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    query_label, key_label, value_label = ctx.tlabel(q), ctx.tlabel(k), ctx.tlabel(v)
    query_meta, key_meta = ctx.meta(q), ctx.meta(k)
    if not (len(query_label) == len(key_label) == len(value_label) >= 3):
        ctx.freeze_inputs("attention inputs of unequal rank")
        return ctx.unlabeled_output()
    # q . k sums over E index by index: dropping a dim on one side only would pair the wrong dims
    ctx.unify(query_label[-1], key_label[-1], query_meta.shape[-1])
    if ctx.arg(6, "scale") is None and query_label[-1] is not None:
        ctx.freeze(query_label[-1],
                   "head dims under the implicit 1/sqrt(head_dim) softmax scale (pass scale= to prune them)")
    # positions are never pruned, but k and v must agree on them; unified first, the freeze reaches v's label too
    ctx.unify(key_label[-2], value_label[-2], key_meta.shape[-2])
    ctx.freeze(key_label[-2], "key positions of an attention")
    ctx.freeze(query_label[-2], "query positions of an attention")
    batch: List[AxisLabel] = []
    n = len(query_label)
    for i in range(n - 2):
        key_value = ctx.unify_all([key_label[i], value_label[i]], key_meta.shape[i])
        if query_meta.shape[i] == key_meta.shape[i]:
            batch.append(ctx.unify_all([query_label[i], key_value], query_meta.shape[i]))
        # only the head axis (third from the end) may differ, and only under enable_gqa (> 0: no division by zero)
        elif i == n - 3 and key_meta.shape[i] > 0:
            _grouped(ctx, query_label[i], key_value, query_meta.shape[i], key_meta.shape[i])
            batch.append(query_label[i])
        else:
            ctx.freeze(query_label[i], "attention batch axes that broadcast")
            ctx.freeze(key_value, "attention batch axes that broadcast")
            batch.append(None)
    mask = ctx.arg(3, "attn_mask")
    if ctx.is_tensor(mask):
        mask_label, mask_meta = ctx.tlabel(mask), ctx.meta(mask)
        for j, axis in enumerate(mask_label):
            i = j + n - len(mask_label)
            if i >= 0 and i < n - 2 and mask_meta.shape[j] == query_meta.shape[i] and mask_meta.shape[j] > 1:
                # a bias per head (relative positions, ALiBi) must lose the same heads; an unlabelled
                # one cannot lose any, so it freezes them
                ctx.unify(batch[i], axis, mask_meta.shape[j])
            else:
                ctx.freeze(axis, "attention mask axis")
    return tuple(batch) + (None, value_label[-1])


@rule(nn.MultiheadAttention)
def multihead_attention(ctx: RuleContext, node):
    """``nn.MultiheadAttention``: whole heads are pruned.

    Its forward requires the query width to equal ``embed_dim`` (the q/k/v width), so each query
    channel is tied to the q/k/v rows at the same index; with packed ``in_proj_weight`` the key and
    value inputs share those columns too. A head is then the block of ``head_dim`` such indices, and
    the output projection's input columns follow. The output width (``out_proj`` rows) is free.
    """
    m = ctx.module
    # bias_k/bias_v (a learned extra key) and own kdim/vdim widths do not fit the one-index tying below
    if m.bias_k is not None or not m._qkv_same_embed_dim and (m.kdim != m.embed_dim or m.vdim != m.embed_dim):
        ctx.freeze_inputs("nn.MultiheadAttention with add_bias_kv or separate key/value widths")
        return ctx.unlabeled_output()
    query, key, value = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    e, h = m.embed_dim, m.num_heads
    path = ctx.module_path
    if m._qkv_same_embed_dim:
        rows = ctx.module_param("in_proj_weight", 0)
        cols = ctx.module_param("in_proj_weight", 1)
        # in_proj_weight stacks the q, k and v rows in one tensor: one space, split into thirds by element
        pieces = [rows[:e], rows[e:2 * e], rows[2 * e:]]
        bias = ctx.module_param("in_proj_bias", 0)
        ctx.attach(bias, rows)
        inputs = [cols, cols, cols]
    else:
        pieces = [ctx.module_param(f"{n}_proj_weight", 0) for n in "qkv"]
        inputs = [ctx.module_param(f"{n}_proj_weight", 1) for n in "qkv"]
        bias = ctx.module_param("in_proj_bias", 0)
        if bias is not None:
            # the bias stays packed (3 * embed_dim) even when the weights are separate
            ctx.unify(bias, np.concatenate(pieces), 3 * e)
    out_proj = ctx.model.get_submodule(path + ".out_proj")
    out_cols = ctx.param_axis(out_proj, path + ".out_proj", "weight", 1)
    out_rows = ctx.param_axis(out_proj, path + ".out_proj", "weight", 0)
    ctx.attach(ctx.param_axis(out_proj, path + ".out_proj", "bias", 0), out_rows)
    # one embed_dim serves q, k, v and the attention output (out_proj's columns): tie them index by index
    for piece in pieces[1:] + [out_cols]:
        ctx.unify(pieces[0], piece, e)
    for x, cols in zip((query, key, value), inputs):
        label = ctx.tlabel(x)
        ctx.unify(label[-1] if label else None, cols, e)
        ctx.unify(cols, pieces[0], e)  # forward() checks query width == embed_dim
    # keeper 0 on (heads, head_dim): only whole heads can go, which is what nn.MultiheadAttention can express
    heads = tie_split(ctx, pieces[0], [h, e // h], 0)
    weights_out = ctx.out[1] if isinstance(ctx.out, (list, tuple)) else None
    # the weights count as read unless every user is ``out[0]`` or an unused ``out[1]`` (need_weights defaults True)
    weights_read = weights_out is not None and any(
        user.target is not operator.getitem or (user.args[1] != 0 and user.users) for user in node.users)
    mask = ctx.arg(5, "attn_mask")  # forward(query, key, value, key_padding_mask, need_weights, attn_mask, ...)
    if weights_read or (ctx.is_tensor(mask) and ctx.meta(mask).ndim == 3):
        # returned attention weights (averaged over heads or per head) and (B*H, L, S) masks are
        # sized or valued by the head count
        ctx.freeze(heads, "attention weights returned, or a per-head mask, fix the head count")
    if h % 2 == 0:
        # PyTorch's fused attention (the eval fast path of this module and of nn.TransformerEncoderLayer)
        # refuses an odd head count: keep it even so the pruned model stays on the path it was on
        ctx.require_multiple(heads, 2)
    ctx.record_head_split(path, heads, e // h)
    ctx.mark_producer(out_rows)
    # q rows stand for the whole in_proj space: k and v are unified with them, and they come first in it
    ctx.mark_producer(pieces[0])
    label = ctx.tlabel(query)
    out = tuple(label[:-1]) + (out_rows,)
    return [out, unlabeled(weights_out)] if isinstance(ctx.out, (list, tuple)) else out


def update_multihead_attention(module: nn.MultiheadAttention, old: Dict[str, tuple]) -> None:
    """Whole heads were removed: the head size stays, the head count and widths shrink."""
    # the module still holds its pre-pruning sizes here, so head_dim must be read before they are rewritten
    head_dim = module.embed_dim // module.num_heads
    rows = (module.in_proj_weight.shape[0] // 3) if module.in_proj_weight is not None \
        else module.q_proj_weight.shape[0]
    module.embed_dim = module.kdim = module.vdim = rows
    module.num_heads = rows // head_dim
    module.head_dim = head_dim


register_op(nn.MultiheadAttention, update=update_multihead_attention, width="embed_dim")
