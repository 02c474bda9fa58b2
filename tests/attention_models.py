"""Attention blocks written the ways real codebases write them, for the attention tests.

One configurable block covers: packed qkv (timm) or separate projections (BERT/LLaMA); heads split
with ``-1`` or with the module's ``num_heads`` attribute; ``F.scaled_dot_product_attention`` or
explicit ``softmax(q @ k^T * scale) @ v``; grouped-query attention via ``repeat_interleave``, via
``expand + reshape`` (LLaMA's ``repeat_kv``) or via SDPA's ``enable_gqa``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AttentionBlock(nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=None, head_dim=8, packed=False, sdpa=True, explicit_scale=True,
                 split_with="attribute", gqa="repeat_interleave", ffn=48):
        super().__init__()
        self.num_heads, self.num_key_value_heads = heads, kv_heads or heads
        self.head_dim, self.packed, self.sdpa, self.gqa = head_dim, packed, sdpa, gqa
        self.explicit_scale, self.split_with = explicit_scale, split_with
        self.scale = head_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        if packed:
            self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        else:
            self.q = nn.Linear(dim, heads * head_dim)
            self.k = nn.Linear(dim, self.num_key_value_heads * head_dim)
            self.v = nn.Linear(dim, self.num_key_value_heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def _heads(self, t, n_heads):
        b, n, _ = t.shape
        if self.split_with == "attribute":
            return t.view(b, n, n_heads, self.head_dim).transpose(1, 2)
        return t.view(b, n, -1, self.head_dim).transpose(1, 2)

    def _repeat(self, t):
        groups = self.num_heads // self.num_key_value_heads
        if groups == 1 or (self.sdpa and self.gqa == "enable_gqa"):
            return t
        if self.gqa == "repeat_interleave":
            return t.repeat_interleave(groups, dim=1)
        b, h, n, d = t.shape  # LLaMA's repeat_kv
        return t[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.norm(x)
        if self.packed:
            qkv = self.qkv(h).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q = self._heads(self.q(h), self.num_heads)
            k = self._heads(self.k(h), self.num_key_value_heads)
            v = self._heads(self.v(h), self.num_key_value_heads)
        k, v = self._repeat(k), self._repeat(v)
        if self.sdpa:
            scale = self.scale if self.explicit_scale else None
            o = F.scaled_dot_product_attention(q, k, v, scale=scale,
                                               enable_gqa=self.gqa == "enable_gqa" and k.shape[1] != q.shape[1])
        else:
            scale = self.scale if self.explicit_scale else 1 / math.sqrt(q.size(-1))
            o = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, -1))
        return x + self.fc2(F.gelu(self.fc1(x)))


class Encoder(nn.Module):
    """Embedding -> attention blocks -> classifier: the residual stream is prunable."""

    def __init__(self, n_blocks=2, dim=32, vocab=50, classes=3, **block):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[AttentionBlock(dim=dim, **block) for _ in range(n_blocks)])
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.blocks(self.embed(ids)).mean(1))


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention`` between two projections."""

    def __init__(self, dim=32, heads=4, batch_first=True):
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.out = nn.Linear(dim, 5)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a, _ = self.attn(h, h, h, need_weights=False)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.out(torch.relu(a))
