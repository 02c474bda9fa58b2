"""Heads of Swin V2 and XCiT attention: cosine attention, per-head temperatures, widths read from the input.

What kept their heads whole was not the cosine attention (``F.normalize`` over the head dim, the clamped
and exponentiated per-head ``logit_scale``, the ``16 * sigmoid`` position-bias MLP, XCiT's ``temperature``):
those pass each head's label through. It was where the attention's width is *read from its input*:

* timm Swin V2 closes with ``reshape(B_, N, C)``, ``C`` read from the attention input, and pads its feature map
  to a window multiple with ``F.pad(x, (0, 0, 0, pad_w, 0, pad_h))`` with computed amounts. The pad rule
  counted the channel axis (its pair of literal zeros) as padded, so ``C`` lost its label and the heads froze;
* XCiT splits heads with ``reshape(B, N, 3, self.num_heads, C // self.num_heads)``: the computed size froze
  ``C``, and with it the heads its closing ``reshape(B, N, C)`` ties to ``C``;
* Hugging Face Swin V2 is captured by torch.export, where ``F.normalize`` decomposes into
  ``aten.linalg_vector_norm`` and ``aten.expand_as``, which had no rule.

Attention that reads its width from its input can only lose heads together with that width (the residual
stream, ``hidden=True``, the default): channel ``i`` of the width goes with head ``i // head_dim``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import outputs, slim_exact
from torch import nn

import structprune as sp


# ---- synthetic modules ------------------------------------------------------------------------------------
class CosineAttention(nn.Module):
    """Swin V2's window attention: packed qkv with separate q/v biases, cosine similarity scaled by a per-head
    ``clamp(logit_scale).exp()``, and a per-head bias from a continuous position MLP (``16 * sigmoid``).
    ``close_with_input_width`` closes with ``reshape(B, N, C)`` (C read from the input) instead of ``-1``."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 9, close_with_input_width: bool = False):
        super().__init__()
        self.num_heads, self.close_with_input_width = heads, close_with_input_width
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(0.1 * torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(0.1 * torch.randn(dim))
        self.logit_scale = nn.Parameter(torch.log(1 + 10 * torch.rand(heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, heads, bias=False))
        self.register_buffer("coords", torch.randn(tokens * tokens, 2))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        bias = self.cpb_mlp(self.coords).view(-1, self.num_heads).view(n, n, -1).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
        out = (attn.softmax(-1) @ v).transpose(1, 2)
        out = out.reshape(b, n, c) if self.close_with_input_width else out.reshape(b, n, -1)
        return self.proj(out)


class TokenCosineModel(nn.Module):
    """Tokens -> cosine attention (closed with ``-1``) -> head: the head count is the attention's own."""

    def __init__(self, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.attn = CosineAttention(32, heads, tokens=3)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head((h + self.attn(h)).mean(1))


class WindowedCosineModel(nn.Module):
    """A Swin V2 stage in miniature: patch embedding, channels-last map padded to a window multiple with
    computed amounts, windows of ``window**2`` tokens, post-norm residual attention closed with
    ``reshape(B_, N, C)``."""

    def __init__(self, dim: int = 32, heads: int = 4, window: int = 3):
        super().__init__()
        self.window = window
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.attn = CosineAttention(dim, heads, window * window, close_with_input_width=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        s = self.window
        x = F.pad(x, (0, 0, 0, (s - w % s) % s, 0, (s - h % s) % s))
        hp, wp = x.shape[1], x.shape[2]
        windows = x.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        windows = windows + self.norm(self.attn(windows))
        return self.head(windows.reshape(b, -1, c).mean(1))


class CrossCovarianceAttention(nn.Module):
    """XCiT's attention over channels: heads split with ``C // self.num_heads`` (C read from the input),
    q and k normalised over the tokens, a (head_dim x head_dim) attention scaled by a per-head ``temperature``."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.num_heads = heads
        self.temperature = nn.Parameter(1 + torch.rand(heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        out = (attn.softmax(-1) @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj(out)


class XCiTLike(nn.Module):
    """Embedding -> LayerNorm -> cross-covariance attention (residual) -> head."""

    def __init__(self, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.norm = nn.LayerNorm(32)
        self.attn = CrossCovarianceAttention(32, heads)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(self.norm(h))
        return self.head(h.mean(1))


class PerHeadWidthAttention(nn.Module):
    """Plain attention whose head size is ``C // self.num_heads`` of the input width, with SDPA."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.num_heads = heads
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2).reshape(b, n, c)
        return self.head((h + self.proj(out)).mean(1))


class ChannelsLastPad(nn.Module):
    """conv -> channels last -> pad H and W by computed amounts (the channel pair is literal zeros) -> conv."""

    def __init__(self, channel_pad: int = 0):
        super().__init__()
        self.channel_pad = channel_pad
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8 + channel_pad, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).permute(0, 2, 3, 1)
        h, w = y.shape[1], y.shape[2]
        y = F.pad(y, (0, self.channel_pad, 0, (4 - w % 4) % 4, 0, (4 - h % 4) % 4))
        return self.b(y.permute(0, 3, 1, 2))


class VectorNorm(nn.Module):
    """``x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)`` between two linear layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(1e-6))


def _seeded(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).eval()


TOKENS = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
IMAGE = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(2))


# ---- the rules, one cause at a time -----------------------------------------------------------------------
def test_pad_with_computed_spatial_amounts_keeps_the_channel_label():
    small, _ = slim_exact(_seeded(ChannelsLastPad), torch.randn(1, 3, 6, 7), 0.5)
    assert small.a.out_channels == 4 and small.b.in_channels == 4


def test_pad_of_the_channel_axis_still_freezes_it():
    model = _seeded(ChannelsLastPad, channel_pad=2)
    small, report = sp.slim_with_report(model, torch.randn(1, 3, 6, 7), 0.5)
    assert small.a.out_channels == 8
    assert any("spatial op over a channel axis" in reason for g in report.graph.groups for reason in g.frozen_reasons)


def test_linalg_vector_norm_is_a_statistic_not_an_unknown_op():
    small, report = sp.slim_with_report(_seeded(VectorNorm), torch.randn(4, 6), 0.5)
    assert not report.unknown_ops and report.verification.passed and not report.verification.exact
    assert small.a.out_features == 8


def test_cosine_attention_and_per_head_parameters_prune_whole_heads_exactly():
    # normalize over the head dim, clamp(logit_scale).exp() and the sigmoid bias MLP all pass heads through
    small, _ = slim_exact(_seeded(TokenCosineModel), TOKENS, 0.5, hidden=False)
    attn = small.attn
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 16 and attn.proj.in_features == 16
    assert attn.logit_scale.shape == (2, 1, 1) and attn.cpb_mlp[2].out_features == 2
    assert attn.q_bias.shape == attn.k_bias.shape == attn.v_bias.shape == (16,)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_cosine_attention_prunes_heads_under_either_tracer(tracer):
    # under export F.normalize is aten.linalg_vector_norm -> clamp_min -> expand_as -> div
    small, report = sp.slim_with_report(_seeded(TokenCosineModel), TOKENS, 0.5, hidden=False, tracer=tracer)
    assert report.graph.trace.tracer == tracer and not report.unknown_ops
    assert report.verification.passed and small.attn.num_heads == 2 and small.attn.logit_scale.shape[0] == 2


def test_swin_v2_windows_padded_and_closed_with_the_input_width_prune_heads_with_it():
    model = _seeded(WindowedCosineModel)
    small, report = sp.slim_with_report(model, IMAGE, 0.5)
    assert report.verification.passed, report.verification.message
    attn = small.attn
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * 8  # whole heads of 8 dims
    assert small.embed.out_channels == 16 and attn.logit_scale.shape[0] == attn.cpb_mlp[2].out_features == 2
    assert outputs(small, torch.randn(1, 3, 7, 11)).shape == (1, 5)  # other paddings still fit


def test_heads_read_from_the_input_width_stay_whole_when_that_width_is_kept():
    # reshape(B_, N, C) needs heads * head_dim == C: with hidden=False C cannot shrink, so neither can the heads
    small = sp.slim(_seeded(WindowedCosineModel), IMAGE, 0.5, hidden=False)
    assert small.attn.num_heads == 4 and small.embed.out_channels == 32


def test_xcit_cross_covariance_attention_prunes_heads_with_the_width():
    small, report = sp.slim_with_report(_seeded(XCiTLike), TOKENS, 0.5)
    assert report.verification.passed, report.verification.message
    attn = small.attn
    assert attn.num_heads == 2 and attn.temperature.shape == (2, 1, 1)
    assert attn.qkv.out_features == 3 * 16 and small.embed.out_features == 16  # head size 8 = 16 // 2 kept
    assert outputs(small, torch.randn(1, 5, 6)).shape == (1, 5)


def test_xcit_heads_stay_whole_when_the_width_is_kept():
    small = sp.slim(_seeded(XCiTLike), TOKENS, 0.5, hidden=False)
    assert small.attn.num_heads == 4 and small.attn.qkv.out_features == 96


@pytest.mark.parametrize("attention", ["heads", "head_dims"])
def test_a_head_size_computed_from_the_input_width_follows_either_axis(attention):
    small, report = sp.slim_with_report(_seeded(PerHeadWidthAttention), TOKENS, 0.5, attention=attention)
    assert report.verification.passed and report.verification.exact, report.verification.message
    width = small.embed.out_features
    assert width == 16 and small.qkv.out_features == 3 * width
    # C // num_heads is the head size: 8 with 2 heads left, or 4 in each of the 4 heads
    assert small.num_heads == (2 if attention == "heads" else 4)


# ---- the models from the issue ----------------------------------------------------------------------------
def test_timm_swinv2_prunes_heads():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=128, embed_dim=32,
                              depths=(2, 2, 2, 2), num_heads=(2, 4, 4, 4), num_classes=10).eval()
    x = torch.randn(1, 3, 128, 128)
    small, report = sp.slim_with_report(model, x, 0.5)
    assert report.verification.passed and not report.unknown_ops, str(report)
    attn = small.layers[1].blocks[1].attn  # a shifted-window block: its mask is per window, not per head
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * 16 and attn.logit_scale.shape[0] == 2
    assert [b.attn.num_heads for layer in small.layers for b in layer.blocks] == [1, 1, 2, 2, 2, 2, 2, 2]
    assert outputs(small, torch.randn(2, 3, 128, 128)).shape == (2, 10)


def test_timm_xcit_prunes_heads():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    small, report = sp.slim_with_report(model, x, 0.5)
    assert report.verification.passed and not report.unknown_ops, str(report)
    attns = [b.attn for b in list(small.blocks) + list(small.cls_attn_blocks)]
    assert all(a.num_heads == 2 for a in attns)  # 4 -> 2, class attention included
    assert small.blocks[0].attn.qkv.out_features == 3 * 2 * 32 and small.blocks[0].attn.temperature.shape[0] == 2
    assert small.cls_attn_blocks[0].attn.q.out_features == 2 * 32
    assert outputs(small, torch.randn(2, 3, 96, 96)).shape == (2, 10)


def test_torchvision_swin_v2_prunes_heads():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_v2_t(num_classes=10).eval()
    small, report = sp.slim_with_report(model, torch.randn(1, 3, 64, 64), 0.5)
    assert report.verification.passed, str(report)
    attn = small.features[5][0].attn  # 12 heads of 32
    assert attn.num_heads == 6 and attn.qkv.out_features == 3 * 6 * 32 and attn.logit_scale.shape[0] == 6


def test_hugging_face_swinv2_prunes_heads():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Swinv2Config(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                       window_size=4)
    model = transformers.Swinv2Model(config).eval()
    x = torch.randn(1, 3, 64, 64)
    small, report = sp.slim_with_report(model, x, 0.5)
    assert report.verification.passed and not report.unknown_ops, str(report)
    heads = [b.attention.self for layer in small.encoder.layers for b in layer.blocks]
    assert [h.num_attention_heads for h in heads] == [1, 1, 2, 2]
    assert heads[2].query.out_features == heads[2].all_head_size == 2 * 16 and heads[2].logit_scale.shape[0] == 2
    assert outputs(small, torch.randn(2, 3, 64, 64)).last_hidden_state.shape[0] == 2
