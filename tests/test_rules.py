"""One test (or a few) per op rule: tiny models, numerically checked."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import outputs, slim_exact

import structprune as sp

torch.manual_seed(0)


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list:
    """Which rows of ``original`` survive in ``pruned`` (matched exactly, in order)."""
    kept = []
    for row in pruned:
        matches = [i for i, r in enumerate(original) if torch.equal(r, row)]
        assert len(matches) == 1
        kept.append(matches[0])
    assert kept == sorted(kept)
    return kept


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_conv_chain_matches_independent_reference():
    """Independent of the library's verifier: zero conv2's inputs from the dropped filters by hand."""
    model = Chain().eval()
    x = torch.randn(2, 3, 9, 9)
    small = sp.slim(model, x, 0.5, verify=False)
    kept = _kept_rows(model.conv1.weight, small.conv1.weight)
    assert len(kept) == 4 and small.conv1.out_channels == 4 and small.conv2.in_channels == 4
    reference = Chain().eval()
    reference.load_state_dict(model.state_dict())
    dropped = [i for i in range(8) if i not in kept]
    with torch.no_grad():
        reference.conv2.weight[:, dropped] = 0
    torch.testing.assert_close(outputs(small, x), outputs(reference, x), rtol=1e-5, atol=1e-6)


def test_l2_criterion_drops_smallest_filters():
    model = Chain().eval()
    with torch.no_grad():
        for i in range(8):
            model.conv1.weight[i] *= (i + 1)  # filter i's norm grows with i
            model.conv1.bias[i] = 0.01 * (i + 1)
            model.conv2.weight[:, i] *= (i + 1)
    small = sp.slim(model, torch.randn(1, 3, 5, 5), 0.5)
    assert _kept_rows(model.conv1.weight, small.conv1.weight) == [4, 5, 6, 7]


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


def test_flatten_linear_removes_spatial_blocks():
    model = FlattenHead().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 4, 4)
    small, _ = slim_exact(model, x, 0.5)
    kept = _kept_rows(model.conv.weight, small.conv.weight)
    assert small.fc.in_features == 3 * 16
    expected = model.fc.weight.reshape(5, 6, 16)[:, kept].reshape(5, -1)
    assert torch.equal(small.fc.weight, expected)
    assert torch.equal(small.bn.running_var, model.bn.running_var[kept])
    assert small.bn.num_features == 3


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b(torch.relu(self.a(x)))
        return self.head(x)


def test_residual_add_couples_both_sides():
    model = Residual()
    x = torch.randn(1, 3, 6, 6)
    dg = sp.DependencyGraph(model, x)
    stem_group = next(g for g in dg.groups if ("stem.weight", 0) in g.members)
    assert ("b.weight", 0) in stem_group.members and ("head.weight", 1) in stem_group.members
    assert ("a.weight", 1) in stem_group.members
    small, _ = slim_exact(model, x)
    assert small.stem.out_channels == small.b.out_channels == small.head.in_channels == 4


class Depthwise(nn.Module):
    def __init__(self, multiplier=1, groups=None):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=groups or 8)
        self.bn = nn.BatchNorm2d(8 * multiplier)
        self.out = nn.Conv2d(8 * multiplier, 4, 1)

    def forward(self, x):
        return self.out(self.bn(self.dw(self.pw(x))))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_removes_whole_groups(multiplier):
    model = Depthwise(multiplier).eval()
    small, _ = slim_exact(model, torch.randn(1, 3, 5, 5), 0.5)
    assert small.dw.groups == 4 and small.dw.weight.shape[1] == 1
    assert small.dw.in_channels == small.pw.out_channels == 4
    assert small.dw.out_channels == small.bn.num_features == small.out.in_channels == 4 * multiplier


@pytest.mark.parametrize("multiplier,groups", [(1, 4), (2, 2), (1, 2)])
def test_grouped_conv_keeps_groups_and_narrows_each(multiplier, groups):
    model = Depthwise(multiplier, groups).eval()
    small, _ = slim_exact(model, torch.randn(1, 3, 5, 5), 0.5)
    assert small.dw.groups == groups
    assert small.dw.in_channels == small.pw.out_channels == 4
    assert small.dw.out_channels == small.bn.num_features == small.out.in_channels == 4 * multiplier
    assert small.dw.weight.shape[1] == 4 // groups  # every group lost the same input positions


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.out = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.out(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_concat_maps_segments():
    model = Concat().eval()
    model.bn.running_mean.normal_()
    x = torch.randn(1, 3, 4, 4)
    small, _ = slim_exact(model, x)
    # the BatchNorm spans both segments: one group, but each producing layer loses half its own channels
    assert small.a.out_channels == 2 and small.b.out_channels == 3
    assert small.bn.num_features == 5 and small.out.in_channels == 5


class ChunkHalves(nn.Module):
    def __init__(self, literal_split=False):
        super().__init__()
        self.literal_split = literal_split
        self.stem = nn.Conv2d(3, 8, 1)
        self.left = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = torch.split(x, 4, dim=1) if self.literal_split else x.chunk(2, dim=1)
        return self.out(torch.cat([self.left(a), b], 1))


def test_chunk_ties_halves_and_literal_split_freezes():
    x = torch.randn(1, 3, 4, 4)
    small, report = slim_exact(ChunkHalves(), x)
    # chunk(2) ties channel i of each half: the stem keeps an even count, both halves alike
    assert small.stem.out_channels % 2 == 0 and small.left.in_channels == small.stem.out_channels // 2
    assert small.out.in_channels == small.left.out_channels + small.stem.out_channels // 2
    # stem pairs and left's filters meet in out's input: one group; each producer loses half its units
    assert small.stem.out_channels == 4 and small.left.out_channels == 2
    small, report = sp.slim_with_report(ChunkHalves(literal_split=True), x, 0.5)
    assert small.stem.out_channels == 8  # split(4) is a constant: the stem stays whole
    assert small.left.out_channels == 2  # the branch's own output still prunes
    assert report.verification.passed


class ViewConstant(nn.Module):
    def __init__(self, dynamic: bool):
        super().__init__()
        self.dynamic = dynamic
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8 * 9, 3)

    def forward(self, x):
        y = self.conv(x)
        y = y.view(y.size(0), -1) if self.dynamic else y.view(y.size(0), 72)
        return self.fc(y)


def test_view_with_literal_channel_size_freezes():
    x = torch.randn(2, 3, 3, 3)
    small, _ = slim_exact(ViewConstant(dynamic=True), x)
    assert small.conv.out_channels == 4 and small.fc.in_features == 36
    dg = sp.DependencyGraph(ViewConstant(dynamic=False), x)
    conv_group = next(g for g in dg.groups if ("conv.weight", 0) in g.members)
    assert not conv_group.prunable and "constant" in conv_group.frozen_reason
    small = sp.slim(ViewConstant(dynamic=False), x, 0.5)
    assert small.conv.out_channels == 8


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.gamma = nn.Parameter(torch.rand(1, 8, 1, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.silu(self.conv(x))
        s = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.head(x * s * self.gamma)


def test_squeeze_excite_and_layer_scale_parameter():
    model = SqueezeExcite()
    small, _ = slim_exact(model, torch.randn(2, 3, 6, 6))
    assert small.gamma.shape == (1, 4, 1, 1)
    assert small.expand.out_channels == 4 and small.reduce.out_channels == 2 and small.head.in_channels == 4


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.shared(torch.relu(self.shared(x))))


def test_module_called_twice_keeps_consistent_channels():
    small, _ = slim_exact(Shared(), torch.randn(1, 3, 5, 5))
    assert small.stem.out_channels == small.shared.in_channels == small.shared.out_channels == 3


class TwoInputsDictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(5, 8)
        self.out = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 2)

    def forward(self, x, y):
        h = torch.tanh(self.a(x) + self.b(y))
        return {"logits": self.out(h), "aux": self.aux(h)}


def test_multiple_inputs_and_dict_outputs():
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    model = TwoInputsDictOut()
    small, _ = slim_exact(model, (x, y))
    assert small.a.out_features == small.b.out_features == small.out.in_features == 4
    out = small(x, y)
    assert out["logits"].shape == (3, 3) and out["aux"].shape == (3, 2)
    small2, _ = slim_exact(model, {"x": x, "y": y})
    assert small2.a.out_features == 4


class NormZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.prelu = nn.PReLU(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.prelu1 = nn.PReLU()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.gn(self.c1(x))
        x = self.prelu(self.inorm(self.c2(x)))
        return self.head(self.prelu1(self.c3(x)))


def test_group_norm_instance_norm_prelu():
    model = NormZoo().eval()
    model.inorm.running_mean.normal_()
    small, _ = slim_exact(model, torch.randn(2, 3, 4, 4))
    assert small.gn.num_groups == 2 and small.gn.num_channels == 4 and small.c1.out_channels == 4
    assert small.inorm.num_features == 4 and small.prelu.num_parameters == 4
    assert small.prelu1.num_parameters == 1


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h.mean(1))


def test_embedding_layernorm_mlp_is_approximate_but_valid():
    ids = torch.randint(0, 20, (2, 5))
    model = TokenMLP().eval()
    small, report = sp.slim_with_report(model, ids, 0.5)
    assert report.verification.passed and not report.verification.exact
    assert small.embed.embedding_dim == 4 and small.norm.normalized_shape == (4,)
    assert small.fc1.out_features == 8 and small.head.in_features == 4
    assert small(ids).shape == (2, 3)


class ConvTransposeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv1d(2, 8, 3, padding=1)
        self.up = nn.ConvTranspose1d(8, 6, 2, stride=2)
        self.vol = nn.Conv3d(1, 4, 1)
        self.head = nn.Conv1d(6, 1, 1)

    def forward(self, x):
        return self.head(self.up(torch.relu(self.down(x))))


def test_conv1d_and_conv_transpose():
    model = ConvTransposeNet()
    small, _ = slim_exact(model, torch.randn(2, 2, 7))
    assert small.down.out_channels == small.up.in_channels == 4 and small.up.out_channels == 3


class SpatialOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.pool(self.conv(x))
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        y = F.pad(y, (1, 1, 1, 1))
        y = F.adaptive_avg_pool2d(y, 3)
        y = y.permute(0, 2, 3, 1).transpose(1, 2).permute(0, 3, 2, 1).contiguous()
        return self.head(y)


def test_pooling_interpolate_pad_permute():
    small, _ = slim_exact(SpatialOps(), torch.randn(1, 3, 10, 10))
    assert small.conv.out_channels == 4 and small.head.in_channels == 4


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.fliplr(self.conv(x))  # no rule for fliplr
        return self.head(torch.relu(self.mid(y)))


def test_unknown_op_freezes_and_is_reported():
    model = Mystery()
    small, report = sp.slim_with_report(model, torch.randn(1, 3, 4, 4), 0.5)
    assert report.unknown_ops == {"torch.fliplr": 1}
    assert small.conv.out_channels == 8 and small.mid.in_channels == 8
    assert small.mid.out_channels == 4  # channels the unknown op never touched still prune
    assert report.verification.passed and report.verification.exact


def test_custom_rule_registration_unfreezes_op():
    from structprune.ops import override

    with override():  # the public decorator registers; override() unregisters on exit
        @sp.rule(torch.fliplr)
        def fliplr(ctx, node):  # flips axis 1 of a 4-D tensor: channel i -> C-1-i
            label = ctx.tlabel(ctx.arg(0))
            return (label[0], None if label[1] is None else label[1][::-1].copy()) + tuple(label[2:])

        small, report = sp.slim_with_report(Mystery(), torch.randn(1, 3, 4, 4), 0.5)
        assert report.unknown_ops == {} and small.conv.out_channels == 4
        assert report.verification.exact and report.verification.passed
    assert sp.slim_with_report(Mystery(), torch.randn(1, 3, 4, 4), 0.5)[1].unknown_ops == {"torch.fliplr": 1}


def test_outputs_and_inputs_are_frozen():
    model = Chain()
    dg = sp.DependencyGraph(model, torch.randn(1, 3, 4, 4))
    out_group = next(g for g in dg.groups if ("conv2.weight", 0) in g.members)
    in_group = next(g for g in dg.groups if ("conv1.weight", 1) in g.members)
    assert not out_group.prunable and "output" in out_group.frozen_reason
    assert not in_group.prunable
    assert sp.slim(model, torch.randn(1, 3, 4, 4), 0.5).conv2.out_channels == 4


def test_dependency_graph_inspection():
    dg = sp.DependencyGraph(Residual(), torch.randn(1, 3, 6, 6))
    text = "\n".join(str(g) for g in dg.groups)
    assert "prunable" in text and "stem.weight dim 0 (8)" in text
    g = dg.graph
    assert g.number_of_nodes() == len(dg.spaces)
    stem = next(n for n, d in g.nodes(data=True) if d["tensor"] == "stem.weight" and d["dim"] == 0)
    neighbours = {g.nodes[n]["tensor"] for n in g.neighbors(stem)}
    assert "a.weight" in neighbours or "b.weight" in neighbours
    import networkx as nx
    assert nx.number_connected_components(g) == len(dg.groups)


class TensorSplit(nn.Module):
    def __init__(self, by_count: bool):
        super().__init__()
        self.by_count = by_count
        self.stem = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = torch.tensor_split(self.stem(x), 2 if self.by_count else [4], dim=1)
        return self.out(a * b)


@pytest.mark.parametrize("by_count", [True, False])
def test_tensor_split_by_count_ties_and_by_index_freezes(by_count):
    small, report = sp.slim_with_report(TensorSplit(by_count), torch.randn(1, 3, 4, 4), 0.5)
    assert report.verification.passed and report.verification.exact
    assert small.stem.out_channels == (4 if by_count else 8)


class Reductions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(3, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        gate = self.a(x).sum(dim=1, keepdim=True)  # a statistic across channels: approximate
        pick = self.c(x).argmax(dim=1, keepdim=True).float()  # an index across channels: frozen
        y = torch.softmax(self.b(x), dim=1) * gate * pick  # softmax over channels: approximate
        return self.head(y.amax(dim=(2, 3)))


def test_cross_channel_statistics_are_approximate_and_index_reductions_freeze():
    small, report = sp.slim_with_report(Reductions(), torch.randn(2, 3, 4, 4), 0.5)
    assert small.a.out_channels == 4 and small.b.out_channels == 4 and small.c.out_channels == 8
    assert report.verification.passed and not report.verification.exact


EXPORT_CASES = [
    (Chain, (2, 3, 9, 9)), (FlattenHead, (2, 3, 4, 4)), (Residual, (1, 3, 6, 6)), (Concat, (1, 3, 4, 4)),
    (SqueezeExcite, (2, 3, 6, 6)), (Shared, (1, 3, 5, 5)), (NormZoo, (2, 3, 4, 4)), (SpatialOps, (1, 3, 10, 10)),
    (ChunkHalves, (1, 3, 4, 4)), (ConvTransposeNet, (2, 2, 7)), (lambda: Depthwise(2), (1, 3, 5, 5)),
    (lambda: Depthwise(1, 4), (1, 3, 5, 5)), (lambda: ViewConstant(True), (2, 3, 3, 3)),
]


@pytest.mark.parametrize("build,shape", EXPORT_CASES, ids=lambda c: getattr(c, "__name__", None) or str(c))
def test_export_tracer_rules_match_fx(build, shape):
    """The ATen-level rules (torch.export path) prune exactly as the module-level ones (fx path)."""
    x = torch.randn(shape)
    torch.manual_seed(1)
    fx_small, fx_report = sp.slim_with_report(build().eval(), x, 0.5, tracer="fx")
    torch.manual_seed(1)
    ex_small, ex_report = sp.slim_with_report(build().eval(), x, 0.5, tracer="export")
    assert ex_report.graph.trace.tracer == "export"
    assert ex_report.verification.passed and ex_report.verification.exact == fx_report.verification.exact
    assert ex_report.params_after == fx_report.params_after, (str(fx_report), str(ex_report))


class TokenSelect(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):  # (B, T, 4): keep the first token, like a [CLS] pooler
        return self.fc2(torch.relu(self.fc1(x)).select(1, 0))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_select_on_a_token_axis_keeps_channels_prunable(tracer):
    small, report = sp.slim_with_report(TokenSelect(), torch.randn(2, 3, 4), 0.5, tracer=tracer)
    assert report.unknown_ops == {} and small.fc1.out_features == 4
    assert report.verification.passed and report.verification.exact


class RollReshapeAs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.roll(self.conv(x), shifts=(1, 1), dims=(2, 3))
        flat = y.flatten(2)  # (B, C, HW)
        y = flat.reshape_as(y) + y.new_zeros(1)
        return self.head(self.conv2(y))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_roll_reshape_as_and_new_factories(tracer):
    small, report = sp.slim_with_report(RollReshapeAs(), torch.randn(1, 3, 5, 5), 0.5, tracer=tracer)
    assert report.unknown_ops == {} and small.conv.out_channels == 4 and small.conv2.out_channels == 4
    assert report.verification.passed and report.verification.exact


class BlurPool(nn.Module):
    """A fixed depthwise filter applied with a literal group count (timm's BlurPool / TResNet)."""

    def __init__(self, channels=8):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(3, channels, 1)
        self.register_buffer("filt", torch.ones(channels, 1, 3, 3) / 9)
        self.head = nn.Conv2d(channels, 2, 1)

    def forward(self, x):
        y = F.conv2d(self.conv(x), self.filt, stride=2, padding=1, groups=self.channels)
        return self.head(y)


class SameConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (timm's Conv2dSame style): its groups attribute is updated."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = SameConv(8, 8, 3, groups=8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.dw(self.pw(x)))


def test_literal_group_count_freezes_but_own_attribute_prunes():
    small, report = sp.slim_with_report(BlurPool(), torch.randn(1, 3, 6, 6), 0.5)
    assert report.verification.passed and small.conv.out_channels == 8
    small, report = slim_exact(SameConvNet(), torch.randn(1, 3, 6, 6))
    assert small.dw.groups == 4 and small.pw.out_channels == 4


class TransposeAttributes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):  # x: (5, 4)
        h = self.a(x).T.mT.T  # (5, 8) -> (8, 5) -> (5, 8) -> (8, 5)
        return self.b(torch.relu(h.T))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_tensor_transpose_attributes_keep_labels(tracer):
    small, report = slim_exact(TransposeAttributes(), torch.randn(5, 4), 0.5, tracer=tracer)
    assert not report.unknown_ops


class NormalizedFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.normalize(self.a(x), dim=1))  # a norm over a's channels


def test_normalize_over_channels_is_approximate_not_unknown():
    small, report = sp.slim_with_report(NormalizedFeatures(), torch.randn(2, 3, 4, 4), 0.5)
    assert small.a.out_channels == 4 and not report.unknown_ops
    assert report.verification.passed and not report.verification.exact


class RMSNormed(nn.Module):
    """Linear -> RMSNorm over the hidden width (a module, or F.rms_norm with the width read from the tensor)."""

    def __init__(self, functional: bool):
        super().__init__()
        self.up, self.down = nn.Linear(6, 32), nn.Linear(32, 4)
        self.norm = nn.RMSNorm(32, eps=1e-5)
        self.functional = functional

    def forward(self, x):
        h = self.up(x)
        if self.functional:
            h = F.rms_norm(h, (h.shape[-1],), self.norm.weight, 1e-5)
        else:
            h = self.norm(h)
        return self.down(h)


@pytest.mark.parametrize("functional", [False, True], ids=["nn.RMSNorm", "F.rms_norm"])
def test_rms_norm_shrinks_with_its_input_and_normalises_over_the_kept_channels(functional):
    model = RMSNormed(functional).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 6)
    small, report = sp.slim_with_report(model, x, 0.5, round_to=None)
    assert report.unknown_ops == {} and small.up.out_features == 16
    assert small.norm.normalized_shape == (16,) and small.norm.weight.shape == (16,)
    kept = _kept_rows(model.up.weight, small.up.weight)
    # independent reference: the statistics of the kept channels only (RMSNorm is inexact under pruning)
    h = x @ model.up.weight[kept].T + model.up.bias[kept]
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * model.norm.weight[kept]
    expected = h @ model.down.weight[:, kept].T + model.down.bias
    torch.testing.assert_close(small(x), expected)


class Windows(nn.Module):
    """Sliding windows (Tensor.unfold) along a spatial axis, or along the channel axis."""

    def __init__(self, over_channels: bool):
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 1)
        self.dim = 1 if over_channels else 2

    def forward(self, x):
        windows = torch.relu(self.a(x)).unfold(self.dim, 3, 1)  # (N, C, L-2, 3) or (N, C-2, L, 3)
        y = windows.amax(-1)
        return self.b(y) if self.dim == 2 else y


def test_unfold_along_a_spatial_axis_keeps_the_channels_prunable():
    model = Windows(over_channels=False).eval()
    x = torch.randn(2, 3, 10)
    small, report = slim_exact(model, x, 0.5)
    assert report.unknown_ops == {} and small.a.out_channels == 4 and small.b.in_channels == 4
    kept = _kept_rows(model.a.weight, small.a.weight)
    zeroed = Windows(over_channels=False).eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        dropped = [c for c in range(8) if c not in kept]
        zeroed.b.weight[:, dropped] = 0
    torch.testing.assert_close(small(x), zeroed(x))


def test_unfold_over_the_channel_axis_freezes_it():
    model = Windows(over_channels=True).eval()
    report = sp.slim_with_report(model, torch.randn(2, 3, 10), 0.5)[1]
    assert report.groups_pruned == 0 and "unfold slides windows over a channel axis" in report.graph.summary()


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("make_norm", [lambda: nn.InstanceNorm2d(8),
                                       lambda: nn.BatchNorm2d(8, affine=False, track_running_stats=False)],
                         ids=["InstanceNorm2d", "BatchNorm2d-stateless"])
def test_a_norm_without_tensors_keeps_num_features_in_step_under_both_tracers(tracer, make_norm):
    # no weight or statistics records its width: under torch.export its forward is inlined into an aten op,
    # and the module must still learn its new width (else every forward warns, and the module lies)
    import warnings

    model = nn.Sequential(nn.Conv2d(3, 8, 3), make_norm(), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    small, report = slim_exact(model, x, 0.5, tracer=tracer)
    assert small[1].num_features == small[0].out_channels == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small(x)


class Warp(nn.Module):
    """Features resampled at learned affine coordinates (a spatial transformer, RAFT's correlation lookup)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.theta = nn.Parameter(torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 0.8, 0.0]]]))

    def forward(self, x):
        y = torch.relu(self.a(x))
        grid = F.affine_grid(self.theta.expand(x.shape[0], 2, 3), [x.shape[0], 1, 6, 5], align_corners=False)
        return self.b(F.grid_sample(y, grid, align_corners=False))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_grid_sample_passes_channels_through_exactly(tracer):
    model = Warp().eval()
    x = torch.randn(2, 3, 9, 9)
    small, report = slim_exact(model, x, 0.5, tracer=tracer)
    assert report.unknown_ops == {} and small.a.out_channels == small.b.in_channels == 4
