"""Scope, targets, round_to, ignore and per-module ratios."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision  # noqa: E402

import structprune as sp


class Stack(nn.Module):
    """Three hidden layers whose importance differs by construction."""

    def __init__(self, scales=(0.01, 1.0, 100.0)):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)])
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            for layer, scale in zip(self.fc, scales):
                layer.weight.mul_(scale)
                layer.bias.mul_(scale)

    def forward(self, x):
        for layer in self.fc:
            x = torch.relu(layer(x))
        return self.head(x)


X = torch.randn(4, 8)


def _widths(model):
    return [layer.out_features for layer in model.fc]


def test_local_scope_is_uniform_and_global_follows_importance():
    model = Stack()
    assert _widths(sp.slim(model, X, 0.5)) == [8, 8, 8]
    small = sp.slim(model, X, 0.5, scope="global", normalize=None)
    widths = _widths(small)
    assert sum(16 - w for w in widths) == 24  # half of the 48 prunable channels
    assert widths[0] < widths[1] < widths[2] or widths[0] == 1  # least important layer loses most
    assert min(widths) >= 1  # no layer is emptied


def test_global_scope_never_empties_a_layer_and_respects_max_group_ratio():
    model = Stack(scales=(1e-6, 1.0, 1.0))
    small = sp.slim(model, X, 0.6, scope="global", normalize=None)
    assert min(_widths(small)) >= 1
    capped = sp.slim(model, X, 0.6, scope="global", normalize=None, max_group_ratio=0.5)
    assert min(_widths(capped)) >= 8


def test_round_to_keeps_multiples():
    model = nn.Sequential(nn.Conv2d(3, 40, 1), nn.ReLU(), nn.Conv2d(40, 24, 1), nn.ReLU(), nn.Conv2d(24, 2, 1))
    small = sp.slim(model, torch.randn(1, 3, 4, 4), 0.3, round_to=8)
    assert small[0].out_channels % 8 == 0 and small[2].out_channels % 8 == 0
    assert small[0].out_channels == 32 and small[2].out_channels == 16


def test_ignore_by_name_glob_instance_and_type_and_per_module_ratios():
    model = Stack()
    assert _widths(sp.slim(model, X, 0.5, ignore=["fc.0"])) == [16, 8, 8]
    assert _widths(sp.slim(model, X, 0.5, ignore=["fc.*"])) == [16, 16, 16]
    assert _widths(sp.slim(model, X, 0.5, ignore=[model.fc[2]])) == [8, 8, 16]
    assert _widths(sp.slim(model, X, 0.5, ignore=[nn.Linear])) == [16, 16, 16]
    assert _widths(sp.slim(model, X, 0.5, ratios={"fc.2": 0.75, "fc.0": 0.0})) == [16, 8, 4]


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
@pytest.mark.parametrize("kind", ["params", "macs"])
def test_targets_land_within_one_point(name, kind):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    small, report = sp.slim_with_report(model, x, target={kind: 0.5}, verify=False)
    if kind == "params":
        removed = 1 - sp.count_parameters(small) / sp.count_parameters(model)
    else:
        removed = 1 - sp.count_macs(small, x) / sp.count_macs(model, x)
    assert abs(removed - 0.5) <= 0.01, removed


def test_unreachable_target_and_bad_options_are_explained():
    model = Stack()
    with pytest.raises(sp.StructPruneError, match="cannot reach"):
        sp.slim(model, X, target={"params": 0.99})
    with pytest.raises(ValueError, match="target must"):
        sp.slim(model, X, target={"flops": 0.5})
    with pytest.raises(ValueError, match="scope"):
        sp.slim(model, X, 0.5, scope="everywhere")
    with pytest.raises(ValueError, match="round_to"):
        sp.slim(model, X, 0.5, round_to=0)
    with pytest.raises(ValueError, match="normalize"):
        sp.slim(model, X, 0.5, normalize="median")
    with pytest.raises(ValueError, match="reduction"):
        sp.slim(model, X, 0.5, reduction="median")
    with pytest.raises(sp.InvalidRatioError):
        sp.slim(model, X, 0.5, ratios={"fc.*": 1.5})


def test_global_ties_are_shared_in_proportion_to_layer_size():
    """Freshly initialised BN scales are all 1: global bn_scale must not empty the first layers."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 1),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 2, 1))
    small = sp.slim(model, torch.randn(1, 3, 4, 4), 0.5, criterion="bn_scale", scope="global")
    assert (small[0].out_channels, small[3].out_channels) == (8, 16)


def test_standard_normalisation_ranks_units_by_how_far_below_their_own_layer_they_are():
    from structprune.scoring import normalize

    np.testing.assert_allclose(normalize(np.array([1.0, 2.0, 3.0]), "standard"), [-1.2247449, 0.0, 1.2247449])
    assert not normalize(np.array([5.0, 5.0]), "standard").any()  # no spread: nothing stands out
    # layer a's scores are tightly bunched, layer b's spread out: b's low outlier goes first in global scope
    scores_a, scores_b = np.array([10.0, 10.1, 10.2, 10.3]), np.array([1.0, 5.0, 5.1, 5.2])
    standard = np.concatenate([normalize(scores_a, "standard"), normalize(scores_b, "standard")])
    assert np.argmin(standard) == 4
