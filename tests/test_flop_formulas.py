"""MACs of fused attention kernels are counted, the same on a CPU as on the meta device.

FlopCounterMode has no formula for the CPU's flash attention or for nn.MultiheadAttention's fast
path and counts them as zero; a MACs target planned on the meta device (where attention is ``bmm``)
then missed on the real model by the attention's share (issue 16, item 7).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import structprune as sp
from structprune.surgery.copying import meta_twin


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def test_cpu_scaled_dot_product_attention_is_counted():
    b, h, lq, lk, d = 2, 3, 5, 7, 8
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    assert sp.count_macs(Attention(), (q, k, v)) == 2 * b * h * lq * lk * d


@pytest.mark.parametrize("make", [
    lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
    lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False),
], ids=["layer", "encoder"])
def test_fused_fast_path_counts_what_the_unfused_path_counts(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(3, 10, 32)
    fused = sp.count_macs(model, x)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        unfused = sp.count_macs(model, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    # the unfused path's layer norms, softmax and biases are not MACs either: the two agree exactly
    assert fused == unfused > 0


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_multi_head_attention_fast_path_is_counted():
    model = SelfAttention().eval()
    x = torch.randn(2, 6, 32)
    b, length, e = 2, 6, 32
    assert sp.count_macs(model, x) == b * (4 * length * e * e + 2 * length * length * e)


def test_nested_sequences_count_their_own_lengths():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).eval()
    x = torch.randn(2, 8, 16)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1, 4:] = True  # the second sequence is 4 tokens long
    counted = sp.count_macs(encoder, {"src": x, "src_key_padding_mask": padding})
    per_sequence = [4 * n * 16 * 16 + 2 * n * n * 16 + 2 * n * 16 * 32 for n in (8, 4)]
    full = 2 * per_sequence[0]
    # nested tensors skip the padding: the count lies between the shorter batch and the padded one
    assert sum(per_sequence) <= counted <= full


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config).eval()


def test_llama_macs_agree_on_cpu_and_meta():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (1, 256))
    assert sp.count_macs(model, (ids,)) == sp.count_macs(meta_twin(model), (ids.to("meta"),))


@pytest.mark.parametrize("target", [0.2, 0.35])
def test_macs_target_on_llama_lands_within_one_point_of_the_measured_count(target):
    model = _tiny_llama()
    ids = torch.randint(0, 256, (1, 256))  # long enough for attention to be a third of the MACs
    before = sp.count_macs(model, (ids,))
    pruned = sp.slim(copy.deepcopy(model), ids, target={"macs": target}, hidden=False)
    achieved = 1 - sp.count_macs(pruned, (ids,)) / before
    assert abs(achieved - target) <= 0.01, achieved
