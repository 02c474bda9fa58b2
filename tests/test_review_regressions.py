"""Regression tests for bugs found in review: each model here once broke or crashed slim()."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import slim_exact

import structprune as sp
from structprune.surgery.shrink import rollback


class GroupNormNoAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16, affine=False)
        self.c2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.gn(self.c1(x))))


def test_group_norm_without_affine_is_frozen_not_miscounted():
    small, report = sp.slim_with_report(GroupNormNoAffine(), torch.randn(2, 3, 8, 8), 0.5)
    assert small.gn.num_groups == 4 and small.c1.out_channels == 16
    assert report.verification.passed and report.verification.exact


class StatelessNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.inorm = nn.InstanceNorm2d(8)  # no parameters, no running statistics
        self.bn = nn.BatchNorm2d(8, affine=False, track_running_stats=False)
        self.c2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c2(self.bn(self.inorm(self.c1(x))))


def test_norms_without_tensors_keep_num_features_in_step():
    small, _ = slim_exact(StatelessNorms(), torch.randn(2, 3, 5, 5))
    assert small.inorm.num_features == small.bn.num_features == small.c1.out_channels == 4


class SkippedDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, a, mask=None, b=None):
        h = torch.relu(self.a(a))
        if b is not None:
            h = h * b
        return self.b(h)


def test_keyword_input_that_skips_a_default_argument():
    small, _ = slim_exact(SkippedDefault(), {"a": torch.randn(3, 4), "b": torch.rand(3, 1)})
    assert small.a.out_features == 4


class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3, padding=1))
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.bn(self.c1(x)))))


def test_parametrized_weights_are_kept_not_crashed_on():
    small, report = sp.slim_with_report(WeightNormed().eval(), torch.randn(1, 3, 6, 6), 0.5)
    assert report.verification.passed
    assert small.c1.weight.shape[0] == 8 and small.c2.out_channels == 4


class ClampAndCopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.floor = nn.Parameter(torch.rand(8, 1, 1) - 0.5)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.clamp(self.c1(x), min=self.floor)
        buf = torch.zeros_like(y)
        buf.copy_(self.c2(y))
        return self.c3(buf)


def test_tensor_arguments_of_unary_ops_are_coupled():
    small, _ = slim_exact(ClampAndCopy(), torch.randn(2, 3, 4, 4))
    assert small.floor.shape == (4, 1, 1)


class LiteralLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(F.layer_norm(self.fc1(x), (16,), self.ln.weight, self.ln.bias))


def test_functional_layer_norm_with_literal_shape_freezes():
    small, report = sp.slim_with_report(LiteralLayerNorm(), torch.randn(3, 4), 0.5)
    assert small.fc1.out_features == 16 and report.verification.passed


class ImplicitSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c2(F.softmax(self.c1(x), dim=None))  # legacy implicit dim: 1 for 4-D input


def test_softmax_implicit_dim_is_the_channel_axis():
    with pytest.warns(UserWarning):
        small, report = sp.slim_with_report(ImplicitSoftmax(), torch.randn(1, 3, 4, 4), 0.5)
    assert report.verification.passed and not report.verification.exact


class ScalesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x.mul_(2)
        return self.c2(F.relu(self.c1(x)))


def test_in_place_op_on_the_input_never_reaches_the_callers_tensor():
    x = torch.randn(1, 3, 4, 4)
    before = x.clone()
    slim_exact(ScalesItsInput(), x)
    assert torch.equal(x, before)


def test_meta_weights_get_a_clear_error_for_magnitude_criteria():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(1, 3, 4, 4, device="meta")
    with pytest.raises(sp.StructPruneError, match="meta device"):
        sp.slim(model, x, 0.5)
    small = sp.slim(model, x, 0.5, criterion="random", verify=False)
    assert small[0].out_channels == 4 and small[0].weight.is_meta


class NumpyStyleReductions(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.c1(x)
        s = torch.std(y, 1, True, keepdim=True)  # (input, dim, unbiased, keepdim)
        return self.fc((y / (s + 1)).mean(axis=(2, 3)))


def test_reduction_argument_layouts():
    small, report = sp.slim_with_report(NumpyStyleReductions(), torch.randn(2, 3, 4, 4), 0.5)
    assert report.verification.passed
    # std across channels (dim 1, read past ``unbiased``) is a statistic over the pruned channels:
    # they stay prunable, but the group can only be checked approximately
    group = next(g for g in report.graph.groups if any(str(s) == "c1.weight[dim 0]" for s in g.spaces))
    assert not group.exact and small.c1.out_channels == 4


class MixedExactness(nn.Module):
    """A conv trunk (exact) and a LayerNorm MLP (approximate) in one model."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 1)
        self.fc1 = nn.Linear(6, 12)
        self.ln = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        y = self.c2(F.relu(self.bn(self.c1(x)))).mean((2, 3))
        return self.fc2(self.ln(self.fc1(y)))


def test_exact_part_is_checked_value_for_value_when_the_rest_is_approximate():
    small, report = sp.slim_with_report(MixedExactness().eval(), torch.randn(2, 3, 6, 6), 0.5)
    assert not report.verification.exact and "pruned alone" in report.verification.message
    assert small.c1.out_channels == 4 and small.fc1.out_features == 6


# ---- review of the attention work (issue 4) --------------------------------------------------------------
class MHAUse(nn.Module):
    def __init__(self, return_weights: bool, mask3d: bool = False):
        super().__init__()
        self.inp, self.out = nn.Linear(16, 32), nn.Linear(32, 3)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.return_weights, self.mask3d = return_weights, mask3d

    def forward(self, x):
        h = self.inp(x)
        mask = torch.zeros(x.shape[0] * 4, x.shape[1], x.shape[1]) if self.mask3d else None
        y, w = self.mha(h, h, h, attn_mask=mask)  # need_weights defaults to True
        return (self.out(y), w) if self.return_weights else self.out(y)


@pytest.mark.parametrize("return_weights, mask3d, heads_after", [(False, False, 2), (True, False, 4), (False, True, 4)])
def test_multihead_attention_heads_only_go_when_nothing_reads_the_head_count(return_weights, mask3d, heads_after):
    model = MHAUse(return_weights, mask3d).eval()
    x = torch.randn(2, 5, 16)
    for verify in (True, False):
        small = sp.slim(model, x, 0.5, verify=verify)
        assert small.mha.num_heads == heads_after
        small(x)


@dataclasses.dataclass
class LogitsOut:
    logits: torch.Tensor


class DataclassOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 10)

    def forward(self, x, **kwargs):  # **kwargs: fx declines, torch.export captures it
        return LogitsOut(self.b(torch.relu(self.a(x))))


def test_dataclass_outputs_stay_protected_under_export():
    small, report = sp.slim_with_report(DataclassOutput().eval(), (torch.randn(2, 8),), 0.5)
    assert report.graph.trace.tracer == "export"
    assert small.b.out_features == 10 and small.a.out_features == 8


class GatherFixedIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, index):
        return self.b(torch.gather(torch.relu(self.a(x)), 1, index))  # index: (B, K, 16), a fixed width


class BoolMaskIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 16)

    def forward(self, x, mask):
        h = torch.relu(self.a(x))
        return self.b(h), h[mask].sum()  # a (B, C) mask consumes both axes


@pytest.mark.parametrize("model, args", [
    (GatherFixedIndex, (torch.randn(2, 6, 8), torch.randint(0, 6, (2, 3, 16)))),
    (BoolMaskIndex, (torch.randn(2, 8), torch.arange(32).reshape(2, 16) < 16)),
])
def test_fixed_size_indices_pin_the_channels_they_index(model, args):
    small = sp.slim(model().eval(), args, 0.5, verify=False)
    assert small.a.out_features == 16
    small(*args)


def test_verification_leaves_autograd_state_of_the_callers_weights_alone():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    loss = model(torch.randn(3, 8)).pow(2).sum()
    versions = [p._version for p in model.parameters()]
    sp.slim(model, torch.randn(3, 8), 0.5)
    assert [p._version for p in model.parameters()] == versions
    loss.backward()


class ConfigHeads(nn.Module):
    """Attention that reads its head count from a config shared by every layer."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.q, self.k, self.v, self.o = (nn.Linear(config.hidden, config.hidden) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (lin(x).view(b, n, self.config.num_heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class SharedConfigModel(nn.Module):
    def __init__(self):
        super().__init__()
        config = types.SimpleNamespace(num_heads=8, hidden=64)
        self.layers = nn.ModuleList([ConfigHeads(config), ConfigHeads(config)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_config_read_at_run_time_makes_every_layer_keep_the_same_head_count():
    model, x = SharedConfigModel().eval(), torch.randn(2, 5, 64)
    small = sp.slim(model, x, 0.0, hidden=False, verify=False, ratios={"layers.0.q": 0.5, "layers.1.q": 0.25})
    rows = {layer.q.out_features for layer in small.layers}
    assert len(rows) == 1 and small.layers[0].config.num_heads * 8 == rows.pop()
    small(x)


class UnflattenHeads(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = (lin(x).unflatten(-1, (4, -1)).transpose(1, 2) for lin in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))


def test_unflatten_with_a_constant_head_count_keeps_the_heads():
    small = sp.slim(UnflattenHeads().eval(), torch.randn(2, 5, 32), 0.5, verify=False)
    assert small.q.out_features == 32


def test_inplace_rollback_restores_config_fields():
    model = SharedConfigModel().eval()
    config = model.layers[0].config
    before = dict(vars(config))
    with pytest.raises(RuntimeError), rollback(model):
        config.num_heads = 2  # what the config refresh does, in place
        raise RuntimeError("verification failed")
    assert vars(config) == before
