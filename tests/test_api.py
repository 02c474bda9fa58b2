"""The public API: what users get back and what stays the same."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import assert_unchanged, snapshot

import structprune as sp


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Dropout(0.5))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    def describe(self) -> str:  # a user method that must survive pruning
        return "net"


X = torch.randn(2, 3, 12, 12)


def test_slim_returns_same_class_smaller_tensors_same_keys():
    model = Net().train()
    model.features[0].weight.requires_grad_(False)
    snap = snapshot(model)
    small = sp.slim(model, X, 0.5)
    assert type(small) is Net and small.describe() == "net"
    assert small.state_dict().keys() == model.state_dict().keys()
    assert small.features[0].out_channels == 8 and small.features[1].num_features == 8
    assert small.head.in_features == 8
    assert isinstance(small.features[0].weight, nn.Parameter)
    assert small.features[0].weight.requires_grad is False and small.features[3].weight.requires_grad is True
    assert small.training and all(m.training for m in small.modules())  # modes preserved
    assert_unchanged(model, snap)


def test_pruned_model_accepts_other_batch_and_spatial_sizes():
    model = Net().eval()
    small = sp.slim(model, X, 0.5)
    for shape in [(1, 3, 12, 12), (5, 3, 20, 17)]:
        assert small(torch.randn(shape)).shape == model(torch.randn(shape)).shape


def test_inplace_prunes_the_callers_model():
    model = Net().eval()
    small = sp.slim(model, X, 0.5, inplace=True)
    assert small is model and model.features[0].out_channels == 8


def test_ratio_zero_changes_nothing_numerically():
    model = Net().eval()
    small, report = sp.slim_with_report(model, X, 0.0)
    assert report.params_after == report.params_before and report.groups_pruned == 0
    torch.testing.assert_close(small(X), model(X))


def test_report_and_metrics():
    model = Net().eval()
    small, report = sp.slim_with_report(model, X, 0.5)
    assert report.params_before == sp.count_parameters(model)
    assert report.params_after == sp.count_parameters(small) < report.params_before
    assert report.verification.passed and report.verification.exact
    assert "parameters" in str(report) and "verification passed" in str(report)
    assert sp.count_macs(small, X) < sp.count_macs(model, X)
    assert sp.latency_ms(small, X, min_run_time=0.05) > 0


def test_criteria_choose_different_channels_but_all_verify():
    model = Net().eval()
    shapes = set()
    for criterion in ["l2", "l1", "random", lambda group, ctx: torch.arange(len(group)).numpy()]:
        small, report = sp.slim_with_report(model, X, 0.5, criterion=criterion)
        assert report.verification.passed
        shapes.add(small.features[0].out_channels)
    assert shapes == {8}


def test_custom_criterion_keeps_highest_scores():
    model = Net().eval()
    small = sp.slim(model, X, 0.5, criterion=lambda group, ctx: torch.arange(len(group)).double())
    assert torch.equal(small.features[0].weight, model.features[0].weight[8:])


def test_dependency_graph_reports_groups():
    dg = sp.DependencyGraph(Net(), X)
    prunable = dg.prunable_groups
    assert len(prunable) == 2
    assert all(g.size == 16 for g in prunable)
    assert {("features.0.weight", 0), ("features.1.weight", 0), ("features.3.weight", 1)} <= set(prunable[0].members)
    assert "prunable" in dg.summary()


def test_verification_reports_a_relative_error_and_the_old_name_still_reads_it():
    result = sp.VerificationResult(True, True, 3e-7, "ok")
    assert result.max_relative_error == 3e-7
    with pytest.warns(DeprecationWarning, match="max_relative_error"):
        assert result.max_abs_error == 3e-7
