"""Verification on every dtype: correct prunes pass in fp32, bf16 and fp16; a wrong rule fails in each.

Low-precision models are verified in fp32 arithmetic (copies of their own values, see
structprune.precision), so the tolerance stays tight enough to catch a wrong channel mapping.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import assert_unchanged, snapshot
from torch import nn

import structprune as sp
from structprune.ops import override
from structprune.precision import (
    _PRECISION_SWITCHES,
    _backend,
    cast_floats,
    compute_dtype,
    computing_in,
    ieee_fp32,
    native_tolerance,
)
from structprune.verify import computes_alike

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    return LlamaForCausalLM(config), torch.randint(0, 300, (2, 12))


def _vit():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128)
    return model, torch.randn(2, 3, 32, 32)


MODELS = {"resnet18": lambda: (torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 48, 48)),
          "vit": _vit, "llama": _llama}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_low_precision_models_prune_and_verify(name, dtype):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model = model.eval().to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = sp.slim_with_report(model, x, 0.5, round_to=None)
    assert report.verification.passed
    after = model.state_dict()  # the fp32 copies verification computes with never reach the caller's tensors
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert all(p.dtype == dtype for p in model.parameters()) and all(p.dtype == dtype for p in small.parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = small(x)
    out = out.logits if hasattr(out, "logits") else out
    assert out.dtype == dtype and torch.isfinite(out).all()


class Flipped(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.fliplr(torch.relu(self.conv(x))))))


def _as_elementwise(ctx, node):  # wrong on purpose: fliplr reverses the channels, this says it keeps them
    return ctx.tlabel(ctx.arg(0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_wrong_rule_is_caught_in_every_dtype(dtype):
    torch.manual_seed(0)
    model = Flipped().eval().to(dtype)
    snap = snapshot(model)
    with override():
        sp.rule(torch.fliplr)(_as_elementwise)
        with pytest.raises(sp.VerificationError, match="differs from the zeroed original"):
            sp.slim(model, torch.randn(2, 3, 8, 8, dtype=dtype), 0.5, round_to=None)
    assert_unchanged(model, snap)


class PinnedDtype(nn.Module):
    """A forward that casts to bf16 by literal: the model cannot compute in fp32."""

    def __init__(self, flip: bool = False):
        super().__init__()
        self.flip = flip
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x.to(torch.bfloat16)))
        y = torch.fliplr(y) if self.flip else y
        return self.head(torch.relu(self.mid(y)))


def test_a_model_pinned_to_its_dtype_is_checked_in_it():
    torch.manual_seed(0)
    model, x = PinnedDtype().eval().to(torch.bfloat16), torch.randn(2, 3, 8, 8)
    graph = sp.DependencyGraph(model, x)
    assert not computes_alike(graph, torch.float32)
    assert native_tolerance(model) > 1e-3
    small, report = sp.slim_with_report(model, x, 0.5, round_to=None)
    assert report.verification.passed and report.verification.exact
    with override():
        sp.rule(torch.fliplr)(_as_elementwise)
        with pytest.raises(sp.VerificationError):
            sp.slim(PinnedDtype(flip=True).eval().to(torch.bfloat16), x, 0.5, round_to=None)


def test_fp32_models_compute_in_their_own_dtype():
    assert compute_dtype(nn.Linear(2, 2)) is None
    assert compute_dtype(nn.Linear(2, 2).half()) is torch.float32
    assert compute_dtype(nn.Linear(2, 2).double()) is None


def test_ieee_fp32_sets_and_restores_the_switches():
    before = [getattr(_backend(path), attribute) for path, attribute in _PRECISION_SWITCHES]
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # the CUDA default for convolutions
    try:
        with ieee_fp32():
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        for (path, attribute), value in zip(_PRECISION_SWITCHES, before):
            setattr(_backend(path), attribute, value)


def test_computing_in_keeps_ties_and_restores_the_tensors():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)).to(torch.bfloat16)
    model[1].weight = model[0].weight  # tied, like a language model's embedding and head
    weight = model[0].weight
    with computing_in(model, torch.float32):
        assert model[0].weight.dtype == torch.float32 and model[0].weight is model[1].weight
    assert model[0].weight is weight and model[1].weight is weight and weight.dtype == torch.bfloat16
    nested = cast_floats({"a": [torch.ones(1, dtype=torch.half), torch.ones(1, dtype=torch.long)]}, torch.float32)
    assert nested["a"][0].dtype == torch.float32 and nested["a"][1].dtype == torch.long
