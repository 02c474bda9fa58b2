"""``sp.prune_channels``: removing chosen channels with everything coupled to them, and ``sp.iter_groups``:
deciding a plan group by group (issue 16, item 10)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from attention_models import Encoder, TorchMHA
from helpers import assert_unchanged, outputs, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import structprune as sp


class Block(nn.Module):
    """ResNet's BasicBlock: two 3x3 convs with BatchNorm, added to the input (through a 1x1 conv when widths differ)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """ResNet-18's layout, narrow: a stem, two blocks on one residual stream, a downsampling block, a classifier."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


X = torch.randn(2, 3, 8, 8)
# the residual stream of layer1: every layer writing into it
STREAM = ["conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.conv2", "layer1.1.bn2"]
# and every layer reading it, by its input columns
READERS = ["layer1.0.conv1.weight", "layer1.1.conv1.weight", "layer2.0.conv1.weight",
           "layer2.0.downsample.0.weight"]


def tiny_resnet(seed: int = 0) -> TinyResNet:
    """A TinyResNet with random BatchNorm statistics, so no channel is accidentally constant."""
    torch.manual_seed(seed)
    model = TinyResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def zeroed(model: nn.Module, removed: dict) -> nn.Module:
    """A copy of ``model`` whose named layers' output channels are zero: a BatchNorm's scale and shift (its output
    is then exactly zero in eval mode), a conv's filters. Written without structprune, as the independent reference."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for path, indices in removed.items():
            layer = copy_.get_submodule(path)
            for tensor in (layer.weight, getattr(layer, "bias", None)):
                if tensor is not None:
                    tensor[indices] = 0
    return copy_


def kept(n: int, removed) -> list:
    return [i for i in range(n) if i not in set(removed)]


# ---- prune_channels: what goes --------------------------------------------------------------------------------
def test_a_residual_channel_leaves_every_coupled_layer():
    model = tiny_resnet()
    small, report = sp.prune_channels(model, X, {"layer1.0.conv2": [3]})
    assert report.removed == {layer: [3] for layer in STREAM}
    assert report.requested == {"layer1.0.conv2": [3]} and report.expanded == {}
    for name in READERS:
        assert report.tensors[(name, 1)] == [3]
    assert report.verification.passed and report.verification.exact
    for layer in STREAM:
        assert small.get_submodule(layer).weight.shape[0] == 7
    assert small.layer1[0].bn2.num_features == 7 and small.conv1.out_channels == 7


def test_exactly_the_requested_channels_go_and_the_others_keep_their_weights():
    model = tiny_resnet()
    small, report = sp.prune_channels(model, X, {"layer1.0.conv2": [1, 6], "layer1.1.conv1": [0, 2, 5]})
    stream, inner = kept(8, [1, 6]), kept(8, [0, 2, 5])
    assert torch.equal(small.layer1[0].conv2.weight, model.layer1[0].conv2.weight[stream])
    assert torch.equal(small.bn1.running_mean, model.bn1.running_mean[stream])
    assert torch.equal(small.layer2[0].downsample[0].weight, model.layer2[0].downsample[0].weight[:, stream])
    # layer1.1.conv1 reads the stream (columns) and loses its own filters 0, 2, 5 (rows)
    assert torch.equal(small.layer1[1].conv1.weight, model.layer1[1].conv1.weight[inner][:, stream])
    assert torch.equal(small.layer1[1].conv2.weight, model.layer1[1].conv2.weight[stream][:, inner])
    assert torch.equal(small.layer1[0].conv1.weight, model.layer1[0].conv1.weight[:, stream])  # its rows all stay
    assert report.removed["layer1.1.conv1"] == [0, 2, 5] and report.removed["layer1.1.bn1"] == [0, 2, 5]
    assert sorted(report.groups.values()) == [[0, 2, 5], [1, 6]]


def test_pruned_model_equals_the_original_with_those_channels_zeroed():
    model = tiny_resnet()
    snap = snapshot(model)
    small, report = sp.prune_channels(model, X, {"layer1.0.conv2": [3]})
    assert report.verification.exact and report.verification.max_relative_error < 1e-5, report.verification
    reference = zeroed(model, {layer: [3] for layer in STREAM})
    assert torch.allclose(outputs(small, X), outputs(reference, X), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs(small, X), outputs(model, X), rtol=1e-3, atol=1e-4)  # the channel mattered
    assert_unchanged(model, snap)


def test_keys_by_instance_parameter_name_and_input_dim():
    model = tiny_resnet()
    by_instance = sp.prune_channels(model, X, {model.layer1[0].conv2: [3]})[1]
    by_parameter = sp.prune_channels(model, X, {"layer1.0.bn2.weight": [3]})[1]
    by_input = sp.prune_channels(model, X, {("layer1.1.conv1.weight", 1): [3]})[1]
    assert by_instance.removed == by_parameter.removed == by_input.removed == {layer: [3] for layer in STREAM}
    assert by_input.requested == {"layer1.1.conv1.weight[dim 1]": [3]}
    small, report = sp.prune_channels(model, X, {("fc.weight", -1): [0, 15]})
    assert small.fc.in_features == 14 and report.removed["layer2.0.bn2"] == [0, 15]


def test_inplace_prunes_the_callers_model_and_other_index_forms():
    model = tiny_resnet()
    reference = zeroed(model, {layer: [2, 4] for layer in STREAM})
    small, report = sp.prune_channels(model, X, {"conv1": torch.tensor([4, 2, 2])}, inplace=True)
    assert small is model and model.conv1.out_channels == 6
    assert report.requested == {"conv1": [2, 4]}
    assert torch.allclose(outputs(model, X), outputs(reference, X), rtol=1e-5, atol=1e-6)
    assert sp.prune_channels(tiny_resnet(), X, {"conv1": np.int64(1)})[1].removed["bn1"] == [1]


def test_an_empty_request_returns_an_unchanged_copy():
    model = tiny_resnet()
    small, report = sp.prune_channels(model, X, {"conv1": []})
    assert small is not model and report.groups == {} and report.params_after == report.params_before
    assert torch.equal(outputs(small, X), outputs(model, X))


# ---- heads: a unit spans several channels ----------------------------------------------------------------------
def test_one_dim_of_a_head_removes_the_whole_head_and_the_report_says_so():
    torch.manual_seed(0)
    model = Encoder(n_blocks=1).eval()  # 4 heads of 8 dims
    ids = torch.randint(0, 50, (2, 5))
    small, report = sp.prune_channels(model, ids, {"blocks.0.q": [3]})
    head = list(range(8))
    assert report.removed == {"blocks.0.q": head, "blocks.0.k": head, "blocks.0.v": head}
    assert report.expanded == {"blocks.0.q": [0, 1, 2, 4, 5, 6, 7]}
    assert report.tensors[("blocks.0.proj.weight", 1)] == head
    assert "attention head" in str(report)
    assert small.blocks[0].q.out_features == 24 and small.blocks[0].num_heads == 3
    assert torch.equal(small.blocks[0].v.weight, model.blocks[0].v.weight[8:])
    assert report.verification.passed and report.verification.exact


def test_an_embedding_dim_is_the_residual_stream_of_a_transformer():
    torch.manual_seed(0)
    model = Encoder(n_blocks=1).eval()
    ids = torch.randint(0, 50, (2, 5))
    small, report = sp.prune_channels(model, ids, {model.embed: [3]})
    assert report.removed == {layer: [3] for layer in ("embed", "blocks.0.norm", "blocks.0.proj", "blocks.0.fc2")}
    assert report.tensors[("head.weight", 1)] == [3] and small.embed.embedding_dim == 31
    assert report.verification.passed and not report.verification.exact  # LayerNorm mixes the stream's channels


def test_head_dims_mode_removes_that_dim_in_every_head():
    torch.manual_seed(0)
    model = Encoder(n_blocks=1).eval()
    ids = torch.randint(0, 50, (2, 5))
    small, report = sp.prune_channels(model, ids, {"blocks.0.v": [3]}, attention="head_dims")
    assert report.removed["blocks.0.v"] == [3, 11, 19, 27] and report.expanded == {"blocks.0.v": [11, 19, 27]}
    assert small.blocks[0].v.out_features == 28 and report.verification.passed


def test_multihead_attention_by_module_and_an_odd_head_count_is_noted():
    torch.manual_seed(0)
    model = TorchMHA().eval()
    x = torch.randn(2, 5, 16)
    out = sp.prune_channels(model, x, {"attn": [3]})[1]  # nn.MultiheadAttention's output: out_proj's rows
    assert out.removed == {"attn.out_proj": [3], "attn": [3]}
    small, heads = sp.prune_channels(model, x, {"inp": [9]})  # the projection feeding the heads: head 1 goes
    assert heads.expanded == {"inp": [8, 10, 11, 12, 13, 14, 15]} and small.attn.num_heads == 3
    assert any("not a multiple of 2" in note for note in heads.notes)
    assert heads.verification.passed


# ---- errors leave the model unchanged --------------------------------------------------------------------------
class SideOutput(nn.Module):
    """Two convs concatenated into one classifier, the first also returned: one group, whose first four units
    (``a``'s channels, a model output) must stay while ``b``'s may go."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = self.a(x)
        y = torch.relu(torch.cat([a, self.b(x)], 1))
        return self.fc(y.mean((2, 3))), a


@pytest.mark.parametrize("channels, message", [
    ({"layer9.conv": [1]}, "names neither a module nor a parameter"),
    ({"conv1.wieght": [1]}, "did you mean 'conv1.weight'"),
    ({("conv1.wieght", 0): [1]}, "not a parameter or buffer"),
    ({"conv1": [8]}, "channel 8 is out of range: it has 8 channels"),
    ({"conv1": [-1]}, "channel -1 is out of range"),
    ({"conv1": [1.5]}, "must be integers"),
    ({"conv1": "3"}, "must be integers"),
    ({"fc": [0]}, "reaches a model output"),
    ({"conv1": list(range(8))}, "with none of its 8"),
    ({"layer1.0.conv2": [0, 1, 2, 3], "bn1": [4, 5, 6, 7]}, "with none of its 8"),
    ({"layer1": [0]}, "has no output channels"),
    ({("conv1.weight", 2): [0]}, "is not a channel axis"),
    ({("conv1.weight", 4): [0]}, "dim 4 is out of range"),
    ({3: [0]}, "as keys"),
])
def test_bad_requests_raise_and_leave_the_model_unchanged(channels, message):
    model = tiny_resnet()
    snap = snapshot(model)
    with pytest.raises(sp.InvalidOptionError, match=message):
        sp.prune_channels(model, X, channels, inplace=True)
    assert_unchanged(model, snap)


def test_module_outside_the_model_and_unknown_option_raise():
    model = tiny_resnet()
    snap = snapshot(model)
    with pytest.raises(sp.InvalidOptionError, match="not part of the model"):
        sp.prune_channels(model, X, {nn.Conv2d(3, 8, 3): [0]})
    with pytest.raises(sp.InvalidOptionError, match="has no option 'ratio'"):
        sp.prune_channels(model, X, {"conv1": [0]}, ratio=0.5)
    with pytest.raises(sp.InvalidOptionError, match="pass a list of channel indices"):
        sp.prune_channels(model, X, {"conv1": None})
    with pytest.raises(sp.InvalidOptionError, match="must map layers"):
        sp.prune_channels(model, X, [("conv1", [0])])
    assert_unchanged(model, snap)


def test_a_frozen_channel_in_a_prunable_group_says_why():
    torch.manual_seed(0)
    model = SideOutput().eval()
    snap = snapshot(model)
    group = sp.DependencyGraph(model, X).space_of("a.weight", 0).group
    with pytest.raises(sp.InvalidOptionError, match=r"^a: channel 1 cannot be removed: reaches a model output"):
        sp.prune_channels(model, X, {"b": [0], "a": [1, 2]})
    with pytest.raises(sp.InvalidOptionError, match=r"fc.weight\[dim 1\]: channel 3 cannot be removed"):
        sp.prune_channels(model, X, {("fc.weight", 1): [5, 3]})  # columns 0-3 read a's channels
    assert_unchanged(model, snap)
    small, report = sp.prune_channels(model, X, {"b": [1]})
    assert report.groups == {group: [5]} and report.removed == {"b": [1]}
    assert small.b.out_channels == 3 and small.fc.in_features == 7 and report.verification.passed


# ---- interactive: a plan group by group ------------------------------------------------------------------------
def test_iter_groups_accept_modify_skip_then_apply():
    model = tiny_resnet()
    snap = snapshot(model)
    steps = sp.iter_groups(model, X, ratio=0.25, round_to=None)
    proposals = list(steps)
    assert len(steps) == len(proposals) >= 3
    stream = next(p for p in proposals if "conv1" in p.layers)
    assert stream.layers == STREAM and ("layer2.0.conv1.weight", 1) in stream.members
    assert len(stream.proposal) == 2 and len(stream.scores) == 8
    # the proposal is the lowest scores
    assert set(stream.proposal.tolist()) == set(np.argsort(stream.scores, kind="stable")[:2].tolist())
    assert "the plan removes 2" in str(stream)
    skipped = next(p for p in proposals if p.layers == ["layer1.0.conv1", "layer1.0.bn1"])
    accepted = [p for p in proposals if p is not stream and p is not skipped]
    stream.prune([0, 7])                                    # modified
    for p in accepted:
        p.prune()                                           # accepted as proposed
    skipped.skip()                                          # kept whole (also: never calling prune)
    small, report = steps.apply()
    assert report.groups[stream.group.id] == [0, 7] and skipped.group.id not in report.groups
    for p in accepted:
        assert report.groups[p.group.id] == sorted(p.proposal.tolist())
    assert report.removed["layer1.1.bn2"] == [0, 7] and "layer1.0.conv1" not in report.removed
    assert small.layer1[0].conv1.out_channels == 8 and small.conv1.out_channels == 6
    assert report.verification.passed and report.verification.exact
    reference = zeroed(model, report.removed)
    assert torch.allclose(outputs(small, X), outputs(reference, X), rtol=1e-5, atol=1e-6)
    assert_unchanged(model, snap)


def test_iter_groups_refuses_bad_choices_and_can_show_every_group():
    model = tiny_resnet()
    steps = sp.iter_groups(model, X, ratio=0.0, every_group=True)
    assert len(steps) == len(steps.session.graph.prunable_groups)
    assert all(len(p.proposal) == 0 for p in steps)
    group = next(iter(steps))
    with pytest.raises(sp.InvalidOptionError, match="out of range"):
        group.prune([group.group.n_units])
    with pytest.raises(sp.InvalidOptionError, match="with none of its"):
        group.prune(range(group.group.n_units))
    assert group.chosen is None
    assert group.channels([1, 2]) == {layer: [1, 2] for layer in group.layers}
    group.prune([1])
    small, report = steps.apply()
    assert list(report.groups.values()) == [[1]] and report.verification.passed


def test_iter_groups_on_a_session():
    model = tiny_resnet()
    session = sp.PruningSession(model, X, sp.Options.from_kwargs(ratio=0.5, round_to=None))
    steps = sp.InteractivePruning(session)
    assert {p.group.id for p in steps} == set(session.plan().drops)
    for p in steps:
        p.prune()
    _, report = steps.apply()
    reference, _ = sp.slim_with_report(model, X, 0.5, round_to=None)
    assert report.params_after == sp.count_parameters(reference)


# ---- property: any subset of any layer's channels --------------------------------------------------------------
LAYERS = ["conv1", "layer1.0.conv1", "layer1.1.bn1", "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.1"]


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_property_pruned_equals_the_zeroed_original(data):
    model = tiny_resnet(seed=data.draw(st.integers(0, 3), label="seed"))
    request = {}
    for layer in data.draw(st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True), label="layers"):
        width = model.get_submodule(layer).weight.shape[0]
        # under half of a layer each: two layers of one group (layer2.0.conv2 and its downsample) keep a channel
        request[layer] = data.draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=width // 2 - 1,
                                            unique=True), label=layer)
    small, report = sp.prune_channels(model, X, request)
    group_of = {layer: report.graph.space_of(f"{layer}.weight", 0).group for layer in request}
    for layer in request:  # exactly what was asked of the layer's group, no more
        asked = sorted({i for other, indices in request.items() if group_of[other] == group_of[layer]
                        for i in indices})
        assert report.removed[layer] == asked
        assert small.get_submodule(layer).weight.shape[0] == model.get_submodule(layer).weight.shape[0] - len(asked)
    assert report.verification.passed and report.verification.exact
    reference = zeroed(model, report.removed)
    assert torch.allclose(outputs(small, X), outputs(reference, X), rtol=1e-5, atol=1e-5)
