"""A failing rule leaves nothing behind; strict mode makes it fail loudly; rules record through the context."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import structprune as sp
from structprune.graph.labels import ChannelState, HeadSplit
from structprune.ops import override, strict_rules
from structprune.ops.registry import STRICT_ENV, rules_are_strict

X = torch.randn(1, 3, 6, 6)


class Tap(nn.Module):
    """Parameter-free and per-channel; its (test) rule couples it to ``b`` and then raises."""

    def forward(self, x):
        return x * 1


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.head_a, self.head_b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.tap = Tap()

    def forward(self, x):
        y = self.head_b(torch.relu(self.b(x)))
        return y + self.head_a(self.tap(self.a(x)))


def unify_then_raise(ctx, node):
    label = ctx.tlabel(ctx.arg(0))
    b_out = ctx.param_axis(ctx.model.b, "b", "weight", 0)
    ctx.unify(label[1], b_out, 8)  # couples a's channels to b's ...
    ctx.mark_producer(b_out)
    ctx.record_width("b", "out_channels", b_out)
    ctx.record_head_split("b", b_out, 1)
    raise RuntimeError("boom")  # ... and fails: none of that may survive


def _group(dg, member):
    return next(g for g in dg.groups if member in g.members)


@pytest.mark.lenient_rules
def test_a_failing_rule_leaves_no_coupling_behind():
    with override(Tap, rule=unify_then_raise):
        dg = sp.DependencyGraph(TwoBranches(), X)
    a_group, b_group = _group(dg, ("a.weight", 0)), _group(dg, ("b.weight", 0))
    assert a_group is not b_group  # the unification was rolled back
    assert b_group.prunable and not dg.widths and not dg.head_splits
    assert not a_group.prunable and "its rule failed (RuntimeError: boom)" in a_group.frozen_reason


class Scale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class ScaleTwice(nn.Module):
    """``scale`` fails as a module call; later the parent reads ``scale.weight`` directly."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.scale = Scale(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.scale(self.conv(x))
        z = self.conv2(x) * self.scale.weight.view(1, -1, 1, 1)
        return self.head(y + z)


def create_then_raise(ctx, node):
    ctx.module_param("weight", 0)  # creates the space of scale.weight ...
    raise RuntimeError("boom")  # ... which the rollback removes again


@pytest.mark.lenient_rules
def test_a_failing_module_keeps_its_tensors_frozen_when_a_later_node_creates_their_spaces():
    with override(Scale, rule=create_then_raise):
        dg = sp.DependencyGraph(ScaleTwice(), X)
    group = _group(dg, ("scale.weight", 0))
    assert not group.prunable and ("conv2.weight", 0) in group.members
    assert "Scale (scale): its rule failed" in group.frozen_reason


def test_strict_rules_raise_instead_of_freezing(monkeypatch):
    with override(Tap, rule=unify_then_raise):
        with pytest.raises(RuntimeError, match="boom"):
            sp.DependencyGraph(TwoBranches(), X)  # the test session runs with strict rules
        with strict_rules(False):
            assert sp.DependencyGraph(TwoBranches(), X).unknown_ops == {}
    with override(Tap, rule=lambda ctx, node: (None,)):  # a label of the wrong rank
        with pytest.raises(sp.StructPruneError, match="wrong shape"):
            sp.DependencyGraph(TwoBranches(), X)
    monkeypatch.delenv(STRICT_ENV)
    assert not rules_are_strict()
    with strict_rules():
        assert rules_are_strict()
    monkeypatch.setenv(STRICT_ENV, "1")
    assert rules_are_strict()


def test_channel_state_checkpoint_and_rollback():
    state = ChannelState()
    first = state.param_axis("a.weight", 0, 4)
    point = state.checkpoint()
    second = state.param_axis("b.weight", 0, 4)
    state.unify(first, second, "op")
    state.freeze(first[:1], "why")
    state.mark_inexact(first, "why")
    state.mark_producer(second)
    state.record_width("b", "out_channels", second)
    state.record_head_split(HeadSplit("b", second, 1))
    state.bind_attribute(("b", "num_heads"), second)
    assert state.rollback(point) == ["b.weight"]
    assert state.checkpoint() == point and list(state.axis_spaces) == [("a.weight", 0)]
    assert not state.attribute_axes and state.n_elements == 4

    state.freeze_tensor("b.", "the module's rule failed")  # freezes spaces created later too
    again = state.param_axis("b.weight", 0, 4)
    assert np.array_equal(state.frozen[-1].elements, again) and state.frozen[-1].reason == "the module's rule failed"


def test_dependency_graph_read_api():
    bare_norm = nn.BatchNorm2d(8, affine=False, track_running_stats=False)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), bare_norm, nn.Conv2d(8, 4, 1))
    dg = sp.DependencyGraph(model, X)
    assert dg.n_elements == sum(space.size for space in dg.spaces)
    space = dg.space_of("0.weight", 0)
    assert space is not None and space.size == 8 and dg.space_of("0.weight", 3) is None
    producers = dg.producer_mask()
    assert producers.shape == (dg.n_elements,) and producers[space.start:space.start + space.size].all()
    assert [(w.path, w.attribute) for w in dg.widths] == [("1", "num_features")]  # no tensor records its width
    assert dg.head_splits == ()
