"""Rotary position embeddings in ``attention="head_dims"`` mode: ``rotate_half`` pairs head dim ``d``
with ``d + D/2``, so q/k head dims prune in pairs together with the rotary frequencies, exactly."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn

import structprune as sp

warnings.filterwarnings("ignore", message=".*token_id.*")

IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
CONFIGS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}


def _build(name):
    config_cls, model_cls = CONFIGS[name]
    torch.manual_seed(0)
    config = config_cls(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return model_cls(config).eval()


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RotaryAttention(nn.Module):
    """A hand-written rotary self-attention (fx traces it): frequencies as a buffer, explicit scale."""

    def __init__(self, width=32, heads=2, literal_half=False):
        super().__init__()
        self.heads, self.head_dim, self.literal_half = heads, width // heads, literal_half
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        self.scale = self.head_dim ** -0.5

    def rotate(self, x, cos, sin):
        if self.literal_half:  # a bound written as a number: it cannot follow pruning
            half = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
        else:
            half = rotate_half(x)
        return x * cos + half * sin

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq  # (n, D/2): a buffer read by fx
        angles = torch.cat((freqs, freqs), dim=-1)
        q, k = self.rotate(q, angles.cos(), angles.sin()), self.rotate(k, angles.cos(), angles.sin())
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def test_rotate_half_pairs_head_dims_exactly_under_fx():
    torch.manual_seed(0)
    model = RotaryAttention().eval()
    x = torch.randn(2, 5, 32)
    small, report = sp.slim_with_report(model, x, 0.5, attention="head_dims")
    assert report.graph.trace.tracer == "fx"
    assert report.verification.passed and report.verification.exact, report.verification
    assert small.q.out_features == 16 and small.k.out_features == 16 and small.inv_freq.shape == (4,)
    # the kept frequencies are a subset of the original ones: pairs (d, d + D/2) went together
    assert set(small.inv_freq.tolist()) <= set(model.inv_freq.tolist())


def test_a_literal_half_bound_keeps_head_dims_whole():
    torch.manual_seed(0)
    model = RotaryAttention(literal_half=True).eval()
    small, report = sp.slim_with_report(model, torch.randn(2, 5, 32), 0.5, attention="head_dims")
    assert report.verification.passed
    assert small.q.out_features == 32 and small.inv_freq.shape == (8,)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hugging_face_rope_models_prune_q_and_k_head_dims(name, tmp_path):
    model = _build(name)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # weights alone judge a random model here: fine
        small, report = sp.slim_with_report(model, (IDS,), 0.5, attention="head_dims", hidden=False)
    assert report.verification.passed, report.verification
    for layer in small.model.layers:
        attention = layer.self_attn
        assert attention.q_proj.out_features == 4 * head_dim // 2
        assert attention.k_proj.out_features == 2 * head_dim // 2
    rotary = small.model.rotary_emb
    assert rotary.inv_freq.shape == rotary.original_inv_freq.shape == (head_dim // 4,)
    assert torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    generated = small.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    # from_pretrained would recompute the frequencies from the config: the report says so, sp.save keeps them
    assert any("inv_freq" in note for note in report.graph.notes)
    sp.save(small, tmp_path)
    loaded = sp.load(tmp_path, lambda: _build(name))
    torch.testing.assert_close(loaded(IDS).logits, small(IDS).logits, rtol=0, atol=0)
