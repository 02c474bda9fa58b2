"""Mixture-of-experts models: the router's top-k and the experts' grouped matmuls have rules, so the
hidden width, the attention heads and the experts' shared feed-forward width prune (issue 28, first part).

What is not there yet (issue 28): whole-expert removal, per-expert scores, and config fields that describe
the pruned experts (``save_pretrained`` round trips); the report says when the config cannot describe them.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import structprune as sp

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = {
    "qwen3_moe": lambda t: t.Qwen3MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=32, head_dim=16,
                                            num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                                            mlp_only_layers=[]),
    "mixtral": lambda t: t.MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": lambda t: t.OlmoeConfig(**SMALL, intermediate_size=32, num_experts=8, num_experts_per_tok=2),
}


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_decoders_prune_through_router_and_experts(name):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(MOE[name](transformers)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    small, report = sp.slim_with_report(model, (ids,), 0.3)
    assert not report.unknown_ops, report.unknown_ops  # aten.topk and the grouped matmul used to freeze everything
    assert report.verification.passed, report.verification.message
    assert report.params_after < 0.75 * report.params_before
    with torch.no_grad():
        cached = small.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(cached, small.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False,
                                                  pad_token_id=0))


class _PoolBest(nn.Module):
    """Keeps the two strongest positions of every channel: top-k over positions, channels pass through."""

    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        best, _ = torch.topk(self.inner(x), 2, dim=1)
        return self.out(best)


def test_topk_over_positions_keeps_the_channels_prunable_and_exact():
    torch.manual_seed(0)
    small, report = sp.slim_with_report(_PoolBest().eval(), torch.randn(2, 5, 8), 0.5)
    assert small.inner.out_features == 8 and report.verification.passed and report.verification.exact


class _Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 6)

    def forward(self, x):
        return torch.topk(self.gate(x), 2, dim=-1).values


def test_topk_over_channels_freezes_them():
    report = sp.slim_with_report(_Router().eval(), torch.randn(3, 8), 0.5)[1]
    assert report.params_after == report.params_before  # the experts a router picks from stay


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_the_config_describes_the_pruned_experts_and_reloads(name, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(MOE[name](transformers)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    small, report = sp.slim_with_report(model, (ids,), 0.3, hidden=False)
    assert not any("cannot describe" in note for note in report.graph.notes), report.graph.notes
    experts = small.model.layers[0].mlp.experts
    assert experts.down_proj.shape[-1] < model.model.layers[0].mlp.experts.down_proj.shape[-1]
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, small(ids).logits)
