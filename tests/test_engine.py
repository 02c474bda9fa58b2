"""Engine behaviour beyond single rules: tracer fallback, training-only branches, size arguments,
shape propagation, the fast deep copy, and hostile models."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_unchanged, slim_exact, snapshot

import structprune as sp
from structprune.surgery.copying import deep_copy_module


class ShapeBranch(nn.Module):
    """Python control flow on a shape: fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        if x.shape[-1] > 4:
            x = self.c2(x)
        return self.fc(torch.flatten(x, 1))


def test_export_fallback_prunes_and_verifies():
    model = ShapeBranch().eval()
    model.bn.running_mean.normal_()
    small, report = slim_exact(model, torch.randn(2, 3, 8, 8))
    assert report.graph.trace.tracer == "export"
    assert small.c1.out_channels == 8 and small.c2.in_channels == 8 and small.c2.out_channels == 16
    assert small.fc.in_features == 16 * 64
    assert type(small) is ShapeBranch


class AuxHead(nn.Module):
    """An auxiliary classifier that only runs in training mode (like GoogLeNet/Inception)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.aux = nn.Conv2d(8, 2, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        aux = self.aux(x).mean((2, 3)) if self.training else None
        out = self.head(torch.relu(self.mid(x))).mean((2, 3))
        return (out, aux) if self.training else out


def test_training_only_branch_stays_consistent():
    model = AuxHead().eval()
    x = torch.randn(2, 3, 6, 6)
    small, report = slim_exact(model, x)
    assert small.stem.out_channels == 4 and small.aux.in_channels == 4  # the aux head was coupled
    small.train()
    out, aux = small(x)
    assert out.shape == (2, 2) and aux.shape == (2, 2)
    assert model.stem.out_channels == 8


class SizeFromOtherTensor(nn.Module):
    """Reshape a tensor with a size read from another tensor (MaxViT's ``reshape(B, G, P, D)``)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.qkv = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.inp(x)
        b, n, d = x.shape
        h = self.qkv(x).reshape(b, n, 2, 4).transpose(2, 3)  # a head split: freezes qkv's output
        h = h.transpose(2, 3).reshape(b, n, d)  # d belongs to x, not to h
        return self.out(x + h)


def test_size_read_from_another_tensor_couples_the_axes():
    model = SizeFromOtherTensor()
    x = torch.randn(2, 5, 6)
    small, report = sp.slim_with_report(model, x, 0.5)
    assert report.verification.passed
    assert small(x).shape == (2, 5, 3)
    assert small.inp.out_features == 8  # x's channels follow h's, which the head split froze


class InPlaceAndScalars(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("scale", torch.tensor(2.0))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        y.relu_()
        y = y * self.scale + 1.0
        z = self.conv2(y)
        z += y
        return self.head(F.adaptive_avg_pool2d(z, 1).flatten(1))


def test_inplace_ops_and_scalar_buffers():
    small, _ = slim_exact(InPlaceAndScalars(), torch.randn(2, 3, 5, 5))
    assert small.conv.out_channels == 4 and small.head.in_features == 4


class LossModel(nn.Module):
    """Returns a scalar loss and takes a keyword target: all outputs are frozen, inner layers prune."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x, target=None):
        logits = self.head(self.body(x))
        if target is None:
            return logits
        return F.cross_entropy(logits, target)


def test_scalar_loss_output_and_keyword_inputs():
    x, target = torch.randn(5, 4), torch.randint(0, 3, (5,))
    small, _ = slim_exact(LossModel(), {"x": x, "target": target})
    assert small.body[0].out_features == 8 and small.body[2].out_features == 8
    assert small(x, target=target).ndim == 0


def test_model_on_meta_device_is_analysed_without_memory():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 10, 1))
    dg = sp.DependencyGraph(model, torch.randn(1, 3, 32, 32, device="meta"))
    assert [g.size for g in dg.prunable_groups] == [64]


def test_deep_copy_module_matches_deepcopy_semantics():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(3, 3)
            self.again = self.shared  # the same module twice
            self.config = {"widths": [1, 2]}
            self.register_buffer("counter", torch.zeros(2))
            self.hook_calls = []
            self.register_forward_hook(lambda m, i, o: None)

        def forward(self, x):
            return self.again(self.shared(x))

    model = Custom()
    twin = deep_copy_module(model)
    assert twin.shared is twin.again and twin.shared is not model.shared
    assert twin.config == model.config and twin.config is not model.config
    assert twin.config["widths"] is not model.config["widths"]
    assert twin.shared.weight.data_ptr() != model.shared.weight.data_ptr()
    assert len(twin._forward_hooks) == 1
    x = torch.randn(2, 3)
    torch.testing.assert_close(twin(x), model(x))
    with torch.no_grad():
        twin.shared.weight.zero_()
    assert model.shared.weight.abs().sum() > 0


def test_deep_copy_respects_custom_deepcopy():
    class Special(nn.Linear):
        def __deepcopy__(self, memo):
            new = nn.Linear.__new__(Special)
            new.__dict__ = copy.deepcopy(self.__dict__, memo)
            new.copied_specially = True
            return new

    twin = deep_copy_module(nn.Sequential(Special(2, 2)))
    assert getattr(twin[0], "copied_specially", False)


def test_untouched_model_after_every_public_call():
    model = InPlaceAndScalars().train()
    snap = snapshot(model)
    x = torch.randn(2, 3, 5, 5)
    sp.DependencyGraph(model, x)
    sp.slim(model, x, 0.5)
    sp.slim_with_report(model, x, 0.3, criterion="l1")
    sp.count_macs(model, x)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_ratio_applies_per_layer(ratio):
    model = nn.Sequential(nn.Conv2d(3, 20, 1), nn.ReLU(), nn.Conv2d(20, 10, 1), nn.ReLU(), nn.Conv2d(10, 2, 1))
    small = sp.slim(model, torch.randn(1, 3, 4, 4), ratio)
    assert small[0].out_channels == 20 - int(ratio * 20 + 1e-9)
    assert small[2].out_channels == 10 - int(ratio * 10 + 1e-9)
