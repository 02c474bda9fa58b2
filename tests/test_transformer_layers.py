"""PyTorch's own transformer layers (nn.TransformerEncoderLayer/DecoderLayer, nn.TransformerEncoder/
Decoder, nn.Transformer): their feed-forward widths, heads and model width prune through traceable
stand-ins of their forwards, exactly under verification, and the eval fast path survives pruning."""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import structprune as sp
from tests.helpers import assert_unchanged, snapshot


class Classifier(nn.Module):
    """Embedding -> nn.TransformerEncoder -> mean-pooled head: what a user builds from PyTorch's layers."""

    def __init__(self, d_model=64, heads=4, ff=256, layers=2, **layer_options):
        super().__init__()
        self.embed = nn.Linear(12, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, batch_first=True, **layer_options)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 5)

    def forward(self, x, padding=None):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding).mean(1))


class Seq2Seq(nn.Module):
    """Token embeddings -> nn.Transformer (encoder + decoder, causal target mask) -> vocabulary logits."""

    def __init__(self, vocab=50, d_model=64, heads=4, ff=128, **options):
        super().__init__()
        self.src_embed = nn.Embedding(vocab, d_model)
        self.tgt_embed = nn.Embedding(vocab, d_model)
        self.transformer = nn.Transformer(d_model, heads, 2, 2, ff, batch_first=True, **options)
        self.out = nn.Linear(d_model, vocab)

    def forward(self, src, tgt):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.out(self.transformer(self.src_embed(src), self.tgt_embed(tgt), tgt_mask=mask, tgt_is_causal=True))


X = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(0))
SRC = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
TGT = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))


def _fraction_removed(report) -> float:
    return 1 - report.params_after / report.params_before


@contextlib.contextmanager
def _count_fast_path_calls():
    """Count calls of the fused encoder-layer kernel that the eval fast path dispatches to."""
    calls = [0]
    original = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    torch._transformer_encoder_layer_fwd = counting
    try:
        yield calls
    finally:
        torch._transformer_encoder_layer_fwd = original


@pytest.mark.parametrize("options", [{}, {"norm_first": True}, {"activation": "gelu"},
                                     {"activation": nn.GELU(), "bias": False}])
def test_encoder_classifier_prunes_heads_width_and_feed_forward(options):
    torch.manual_seed(0)
    model = Classifier(**options).eval()
    kept = snapshot(model)
    small, report = sp.slim_with_report(model, X, 0.5)
    assert report.verification is not None and report.verification.passed, report.verification
    assert _fraction_removed(report) >= 0.35
    assert small(X).shape == model(X).shape
    for layer in small.encoder.layers:
        attention = layer.self_attn
        assert attention.num_heads == 2 and attention.embed_dim == 32 and attention.head_dim == 16
        assert layer.linear1.out_features == 128 and layer.linear2.in_features == 128
        assert attention.in_proj_weight.shape == (96, 32)
    assert_unchanged(model, kept)
    assert type(model.encoder) is nn.TransformerEncoder  # the traced root's class is restored, here a child's


def test_feed_forward_alone_prunes_exactly():
    """Without the model width (hidden=False) only the feed-forward widths go: per-channel, so exact."""
    torch.manual_seed(0)
    model = Classifier().eval()
    small, report = sp.slim_with_report(model, X, 0.5, hidden=False)
    assert report.verification.passed and report.verification.exact, report.verification
    assert all(layer.linear1.out_features == 128 for layer in small.encoder.layers)
    assert all(layer.self_attn.embed_dim == 64 for layer in small.encoder.layers)


def test_padding_mask_example_input():
    torch.manual_seed(0)
    model = Classifier().eval()
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    small, report = sp.slim_with_report(model, (X, padding), 0.5)
    assert report.verification.passed, report.verification
    assert torch.isfinite(small(X, padding)).all()


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_eval_fast_path_is_still_taken(ratio):
    """4 heads at ratio 0.3 would leave 3, which PyTorch's fused kernels refuse: the head count stays even."""
    torch.manual_seed(0)
    model = Classifier(layers=2).eval()
    small = sp.slim(model, X, ratio)
    for layer in small.encoder.layers:
        assert layer.self_attn.num_heads % 2 == 0
    with torch.no_grad():
        with _count_fast_path_calls() as before:
            model(X)
        with _count_fast_path_calls() as after:
            out = small(X)
    assert before[0] == 2 and after[0] == 2
    assert torch.isfinite(out).all()


def test_seq2seq_transformer_prunes_encoder_decoder_and_cross_attention():
    torch.manual_seed(0)
    model = Seq2Seq().eval()
    small, report = sp.slim_with_report(model, (SRC, TGT), 0.5)
    assert report.verification.passed, report.verification
    assert _fraction_removed(report) >= 0.35
    transformer = small.transformer
    assert transformer.d_model == 32
    for layer in transformer.decoder.layers:
        assert layer.multihead_attn.embed_dim == 32 and layer.multihead_attn.num_heads == 2
    assert small(SRC, TGT).shape == model(SRC, TGT).shape


@pytest.mark.parametrize("build, inputs", [
    (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 96), 2), (torch.randn(5, 2, 32),)),
    (lambda: nn.TransformerDecoderLayer(32, 4, 96, batch_first=True), (torch.randn(2, 5, 32), torch.randn(2, 4, 32))),
    (lambda: nn.Transformer(32, 4, 1, 1, 96), (torch.randn(5, 2, 32), torch.randn(4, 2, 32))),
])
def test_a_transformer_module_as_the_whole_model(build, inputs):
    """The model's own input and output fix its width; the feed-forward widths still prune."""
    torch.manual_seed(0)
    model = build().eval()
    cls = type(model)
    small, report = sp.slim_with_report(model, inputs, 0.5)
    assert type(model) is cls and type(small) is cls  # the root's class is restored after tracing
    assert report.verification.passed and report.params_after < 0.85 * report.params_before
    assert small(*inputs).shape == model(*inputs).shape


def test_pruned_transformer_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    small = sp.slim(Seq2Seq().eval(), (SRC, TGT), 0.5)
    sp.save(small, tmp_path)
    loaded = sp.load(tmp_path, lambda: Seq2Seq().eval())
    torch.testing.assert_close(loaded(SRC, TGT), small(SRC, TGT), rtol=0, atol=0)
    assert loaded.transformer.encoder.layers[0].self_attn.num_heads == 2


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from([2, 4, 6]), head_dim=st.sampled_from([4, 8]), ff=st.integers(4, 40),
       layers=st.integers(1, 2), norm_first=st.booleans(), activation=st.sampled_from(["relu", "gelu"]),
       ratio=st.sampled_from([0.25, 0.5, 0.7]), hidden=st.booleans())
def test_generated_encoders_prune_exactly_and_keep_the_fast_path(heads, head_dim, ff, layers, norm_first, activation,
                                                                 ratio, hidden):
    torch.manual_seed(heads * 100 + ff)
    model = Classifier(heads * head_dim, heads, ff, layers, norm_first=norm_first, activation=activation).eval()
    small, report = sp.slim_with_report(model, X, ratio, hidden=hidden)
    assert report.verification.passed, report.verification
    if not hidden:  # feed-forward channels are per-channel: the comparison is exact
        assert report.verification.exact
    for layer in small.encoder.layers:
        attention = layer.self_attn
        assert attention.num_heads % 2 == 0 and attention.embed_dim == attention.num_heads * head_dim
    with torch.no_grad(), _count_fast_path_calls() as calls:
        small(X)
    assert calls[0] == layers
