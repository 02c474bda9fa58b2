"""Attention heads found in the graph: whole heads, head dims, grouped-query attention, MHA."""
from __future__ import annotations

import pytest
import torch
from attention_models import Encoder, TorchMHA
from helpers import outputs, slim_exact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structprune as sp

IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def _encoder(**block):
    torch.manual_seed(0)
    return Encoder(**block).eval()


def _head_rows(linear, head_dim):
    return linear.weight.shape[0] // head_dim


@pytest.mark.parametrize("style", [
    dict(), dict(packed=True), dict(split_with="minus_one"), dict(sdpa=False), dict(sdpa=False, packed=True),
    dict(explicit_scale=False),
])
def test_whole_heads_are_pruned_exactly(style):
    model = _encoder(heads=4, **style)
    small, report = slim_exact(model, IDS, 0.5, hidden=False)
    block = small.blocks[0]
    assert block.num_heads == 2  # the attribute the forward reads was rewritten
    proj_in = block.proj.weight.shape[1]
    assert proj_in == 2 * block.head_dim  # whole heads went, head_dim intact
    qkv = block.qkv if style.get("packed") else block.q
    assert qkv.weight.shape[0] == (3 if style.get("packed") else 1) * proj_in
    assert small.blocks[0].fc1.out_features == 24  # the FFN width too
    assert small.embed.weight.shape[1] == 32  # hidden=False keeps the residual stream
    assert outputs(small, IDS).shape == (2, 3)


def test_removed_heads_are_the_lowest_scoring_whole_heads():
    model = _encoder(heads=4)
    with torch.no_grad():  # make head 2 of block 0 negligible in q, k, v and proj
        for lin in (model.blocks[0].q, model.blocks[0].k, model.blocks[0].v):
            lin.weight[16:24] *= 1e-3
        model.blocks[0].proj.weight[:, 16:24] *= 1e-3
    small = sp.slim(model, IDS, 0.25, hidden=False)
    kept_rows = small.blocks[0].q.weight
    assert kept_rows.shape[0] == 24
    assert torch.equal(kept_rows[16:24], model.blocks[0].q.weight[24:32])  # head 3 moved into slot 2


@pytest.mark.parametrize("gqa", ["repeat_interleave", "expand", "enable_gqa"])
def test_grouped_query_attention_drops_kv_heads_with_their_query_groups(gqa):
    model = _encoder(heads=8, kv_heads=4, gqa=gqa)
    small, report = slim_exact(model, IDS, 0.5, hidden=False)
    block = small.blocks[0]
    assert block.num_key_value_heads == 2 and block.num_heads == 4
    assert _head_rows(block.k, 8) == 2 and _head_rows(block.q, 8) == 4


def test_head_dims_mode_keeps_the_softmax_scale():
    model = _encoder(heads=4, explicit_scale=True)
    small, report = slim_exact(model, IDS, 0.5, hidden=False, attention="head_dims")
    block = small.blocks[0]
    assert block.head_dim == 4 and block.q.weight.shape[0] == 16  # same 4 dims gone from every head
    assert block.scale == 8 ** -0.5  # the original temperature, so the result is exact


def test_head_dims_under_an_implicit_scale_stay_whole():
    model = _encoder(heads=4, explicit_scale=False)
    small, report = sp.slim_with_report(model, IDS, 0.5, hidden=False, attention="head_dims")
    assert small.blocks[0].q.weight.shape[0] == 32
    assert any("implicit" in (g.frozen_reason or "") for g in report.graph.groups)


def test_hidden_width_prunes_embeddings_norms_and_projections():
    model = _encoder(heads=4)
    small, report = sp.slim_with_report(model, IDS, 0.5)
    assert small.embed.weight.shape[1] == 16 and small.blocks[0].norm.normalized_shape == (16,)
    assert small.head.in_features == 16 and small.blocks[1].fc2.out_features == 16
    assert report.verification.passed and not report.verification.exact  # LayerNorm statistics change


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_prunes_whole_heads(batch_first):
    torch.manual_seed(0)
    model = TorchMHA(batch_first=batch_first).eval()
    x = torch.randn(3, 6, 16)
    small, report = slim_exact(model, x, 0.5)
    attn = small.attn
    assert attn.num_heads == 2 and attn.embed_dim == 16 and attn.head_dim == 8
    assert attn.in_proj_weight.shape == (48, 16) and attn.out_proj.in_features == 16
    assert outputs(small, x).shape == (3, 6, 5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from([2, 4, 6]), groups=st.sampled_from([1, 2]), head_dim=st.sampled_from([4, 8]),
       packed=st.booleans(), sdpa=st.booleans(), split_with=st.sampled_from(["attribute", "minus_one"]),
       gqa=st.sampled_from(["repeat_interleave", "expand", "enable_gqa"]),
       attention=st.sampled_from(["heads", "head_dims"]),
       ratio=st.sampled_from([0.25, 0.5, 0.7]), hidden=st.booleans())
def test_generated_attention_blocks_prune_consistently(heads, groups, head_dim, packed, sdpa, split_with, gqa,
                                                       attention, ratio, hidden):
    """Any mix of layouts: the pruned model runs, keeps its output shape, and matches the zeroed
    original exactly whenever no normalised width was cut."""
    kv_heads = None if packed else heads // groups
    model = _encoder(heads=heads, kv_heads=kv_heads, head_dim=head_dim, packed=packed, sdpa=sdpa,
                     split_with=split_with, gqa=gqa)
    small, report = sp.slim_with_report(model, IDS, ratio, attention=attention, hidden=hidden)
    assert report.verification.passed
    assert report.verification.exact or hidden
    assert outputs(small, IDS).shape == (2, 3)
    for block in small.blocks:
        q_rows = (block.qkv.weight.shape[0] // 3) if packed else block.q.weight.shape[0]
        assert q_rows == block.num_heads * block.head_dim  # attributes describe the tensors
        assert block.proj.in_features == q_rows


class HiddenWidthUnderExport(torch.nn.Module):
    """ConViT-style attention: head_dim = C // num_heads with C read from the input, and control flow
    that fx cannot trace, so torch.export captures it and bakes C // num_heads into a literal."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.inp = torch.nn.Linear(8, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, 2)

    def forward(self, x):
        h = self.inp(x)
        if h.shape[1] > 0:  # data-dependent branch: fx gives up, export specialises it
            b, n, c = h.shape
            q, k, v = self.qkv(h).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            h = h + self.proj(attended.transpose(1, 2).reshape(b, n, c))
        return self.head(h.mean(1))


def test_a_width_hidden_in_an_exported_literal_is_found_by_the_dry_run():
    torch.manual_seed(0)
    model = HiddenWidthUnderExport().eval()
    x = torch.randn(2, 5, 8)
    small, report = sp.slim_with_report(model, x, 0.5)
    assert report.graph.trace.tracer == "export"
    assert report.verification.passed
    assert small.inp.out_features == 32  # the residual width feeds C // num_heads: kept whole
    assert any("kept whole" in note for note in report.graph.notes)
    assert outputs(small, x).shape == (2, 2)


def test_round_to_counts_channels_so_heads_are_not_rounded_to_multiples_of_eight():
    model = _encoder(heads=12, head_dim=8)
    small = sp.slim(model, IDS, 0.5, hidden=False, round_to=8)
    assert small.blocks[0].num_heads == 6  # 6 heads x 8 dims = 48 channels: already a multiple of 8
    assert small.blocks[0].fc1.out_features % 8 == 0
