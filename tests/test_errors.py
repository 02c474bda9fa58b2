"""Bad input gets a specific error and leaves the caller's model bit-identical."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from helpers import Small, X, assert_unchanged, snapshot

import structprune as sp
from structprune.ops import find_updater, override


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, math.nan, math.inf, "0.5", True, None])
def test_bad_ratio(ratio):
    model = Small()
    snap = snapshot(model)
    with pytest.raises(sp.InvalidRatioError, match="ratio"):
        sp.slim(model, X, ratio)
    with pytest.raises(ValueError):  # also a ValueError for generic handlers
        sp.slim(model, X, ratio, inplace=True)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("not_a_model", [None, "resnet18", lambda x: x, torch.randn(3)])
def test_not_a_module(not_a_model):
    with pytest.raises(sp.InvalidModelError, match="nn.Module"):
        sp.slim(not_a_model, X, 0.5)
    with pytest.raises(TypeError):
        sp.DependencyGraph(not_a_model, X)


def test_example_input_of_wrong_type():
    model = Small()
    snap = snapshot(model)
    with pytest.raises(sp.ExampleInputError, match="example_input must be"):
        sp.slim(model, "an image", 0.5)
    assert_unchanged(model, snap)


def test_example_input_the_model_cannot_run():
    model = Small()
    snap = snapshot(model)
    with pytest.raises(sp.ExampleInputError, match="cannot run on the example input") as info:
        sp.slim(model, torch.randn(2, 5, 8, 8), 0.5, inplace=True)  # 5 channels, conv wants 3
    assert "conv" in str(info.value)
    assert_unchanged(model, snap)


def test_missing_and_unknown_keyword_inputs():
    model = Small()
    with pytest.raises(sp.ExampleInputError, match="no argument"):
        sp.slim(model, {"x": X, "bogus": X}, 0.5)
    with pytest.raises(sp.ExampleInputError, match="does not provide"):
        sp.slim(model, {}, 0.5)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # depends on values: neither fx nor export can capture it
            return y * 2
        return y


def test_untraceable_model_names_both_tracers_and_the_line():
    model = DataDependent()
    snap = snapshot(model)
    with pytest.raises(sp.TraceError) as info:
        sp.slim(model, X, 0.5)
    message = str(info.value)
    assert "torch.fx" in message and "torch.export" in message
    assert "test_errors.py" in message or "y.sum() > 0" in message or "data-dependent" in message.lower()
    assert_unchanged(model, snap)


def test_failure_midway_through_shrinking_rolls_back():
    model = Small().eval()
    model.bn.running_mean.normal_()
    snap = snapshot(model)
    original = find_updater(model.bn)
    calls = []

    def exploding_updater(module, old):
        calls.append(module)
        raise RuntimeError("injected failure")

    with override(nn.BatchNorm2d, update=exploding_updater):
        with pytest.raises(RuntimeError, match="injected failure"):
            sp.slim(model, X, 0.5, inplace=True)
    assert calls, "the injected failure must have happened mid-way"
    assert_unchanged(model, snap)
    assert find_updater(model.bn) is original


def test_verification_failure_raises_and_rolls_back(monkeypatch):
    model = Small().eval()
    snap = snapshot(model)
    import structprune.verify as verify_module
    monkeypatch.setattr(verify_module, "RTOL", -1.0)  # any difference at all now counts as a mismatch
    with pytest.raises(sp.VerificationError, match="Group|group"):
        sp.slim(model, X, 0.5, inplace=True)
    assert_unchanged(model, snap)


def test_unknown_criterion():
    with pytest.raises(ValueError, match="unknown criterion"):
        sp.slim(Small(), X, 0.5, criterion="nonsense")


def test_a_failed_torch_export_prints_no_graph_dump(capsys):
    # torch.export prints the partial graph of a failed capture to stderr; slim reports the failure in its error
    with pytest.raises(sp.TraceError):
        sp.slim(DataDependent(), X, 0.5)
    err = capsys.readouterr().err
    assert "def forward(self" not in err and "GraphModule" not in err, err[:500]


def test_the_dump_filter_drops_dumps_only():
    import io

    from structprune.graph.quiet import DumpFilter

    sink = io.StringIO()
    stream = DumpFilter(sink)
    print("def forward(self, arg0_1):\n    return (arg0_1,)", file=stream)
    print("a warning the user should see", file=stream)
    assert sink.getvalue() == "a warning the user should see\n"
