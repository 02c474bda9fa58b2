"""Every criterion pinned on tiny hand-computed examples, and scores cover whole coupled groups."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import structprune as sp
from structprune.scoring.criteria import ScoringContext, get_criterion


class TwoConvs(nn.Module):
    """conv1 (4 filters) feeds conv2: conv1's filter group = conv1 rows + conv2 input columns."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, bias=False)
        self.conv2 = nn.Conv2d(4, 1, 1, bias=False)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def _group_scores(model, x, criterion, **context):
    dg = sp.DependencyGraph(model, x)
    group = next(g for g in dg.groups if ("conv1.weight", 0) in g.members)
    ctx = ScoringContext(model, dg, **context)
    return np.asarray(get_criterion(criterion)(group, ctx)), group


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwoConvs()


X = torch.randn(3, 2, 5, 5)


def _members(model):
    rows = model.conv1.weight.detach().reshape(4, -1).double()
    cols = model.conv2.weight.detach()[0, :, 0, 0].double().reshape(4, 1)
    return rows, cols


def test_l1_l2_magnitude_match_the_formulas(model):
    rows, cols = _members(model)
    l1 = (rows.abs().sum(1) + cols.abs().sum(1)) / 2
    l2 = (rows.norm(dim=1) + cols.norm(dim=1)) / 2
    np.testing.assert_allclose(_group_scores(model, X, "l1")[0], l1.numpy(), rtol=1e-6)
    np.testing.assert_allclose(_group_scores(model, X, "l2")[0], l2.numpy(), rtol=1e-6)
    np.testing.assert_allclose(_group_scores(model, X, "magnitude")[0],
                               ((rows.abs().mean(1) + cols.abs().mean(1)) / 2).numpy(), rtol=1e-6)
    np.testing.assert_allclose(_group_scores(model, X, "l2", reduction="max")[0],
                               torch.maximum(rows.norm(dim=1), cols.norm(dim=1)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(_group_scores(model, X, "l2", reduction="sum")[0],
                               (rows.norm(dim=1) + cols.norm(dim=1)).numpy(), rtol=1e-6)


def test_fpgm_is_the_sum_of_distances_to_the_other_filters(model):
    rows, cols = _members(model)
    expected = (torch.cdist(rows, rows).sum(1) + torch.cdist(cols, cols).sum(1)) / 2
    np.testing.assert_allclose(_group_scores(model, X, "fpgm")[0], expected.numpy(), rtol=1e-5)


def test_fpgm_drops_the_filter_nearest_the_median_not_the_smallest():
    conv = nn.Conv2d(2, 4, 1, bias=False)
    filters = torch.tensor([[10.0, 0.0], [12.0, 2.0], [12.0, -2.0], [0.25, 0.0]])  # row 0 sits amid 1 and 2
    with torch.no_grad():
        conv.weight.copy_(filters.reshape(4, 2, 1, 1))
    model = nn.Sequential(conv, nn.Conv2d(4, 1, 1, bias=False))
    with torch.no_grad():
        model[1].weight.fill_(1.0)  # identical columns: no preference from the consumer
    x = torch.randn(1, 2, 2, 2)
    kept = lambda small: {tuple(r) for r in small[0].weight.reshape(-1, 2).tolist()}  # noqa: E731
    assert (10.0, 0.0) not in kept(sp.slim(model, x, 0.25, criterion="fpgm"))
    assert (0.25, 0.0) not in kept(sp.slim(model, x, 0.25, criterion="l2"))  # magnitude drops the small one
    assert (0.25, 0.0) in kept(sp.slim(model, x, 0.25, criterion="fpgm"))


def _known_loss(model, batch):
    return model(batch).pow(2).sum()


def test_taylor_and_gradient_against_autograd(model):
    batches = [torch.randn(2, 2, 5, 5) for _ in range(3)]
    grads = [torch.autograd.grad(_known_loss(model, b), [model.conv1.weight, model.conv2.weight]) for b in batches]
    w1, w2 = model.conv1.weight.detach(), model.conv2.weight.detach()
    taylor_rows = sum((w1 * g[0]).reshape(4, -1).sum(1).abs() for g in grads)  # |per-channel w*g| per batch
    taylor_cols = sum((w2 * g[1])[0, :, 0, 0].abs() for g in grads)
    scores, _ = _group_scores(model, X, "taylor", data=batches, loss_fn=_known_loss)
    np.testing.assert_allclose(scores, ((taylor_rows + taylor_cols) / 2).double().numpy(), rtol=1e-4)
    mean_abs_rows = (sum(g[0].abs() for g in grads) / 3).reshape(4, -1).sum(1)
    mean_abs_cols = (sum(g[1].abs() for g in grads) / 3)[0, :, 0, 0]
    scores, _ = _group_scores(model, X, "gradient", data=batches, loss_fn=_known_loss)
    np.testing.assert_allclose(scores, ((mean_abs_rows + mean_abs_cols) / 2).double().numpy(), rtol=1e-4)
    assert model.conv1.weight.grad is None and model.conv2.weight.grad is None  # nothing left behind


def test_gradient_criteria_default_to_cross_entropy_and_restore_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    model[0].weight.requires_grad_(False)
    stats = model[1].running_mean.clone()
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    small = sp.slim(model, torch.randn(2, 4), 0.5, criterion="taylor", data=data)
    assert small[0].out_features == 4
    assert model[0].weight.requires_grad is False and model[3].weight.requires_grad is True
    assert torch.equal(model[1].running_mean, stats) and model.training
    assert all(p.grad is None for p in model.parameters())


def test_gradient_criteria_without_data_say_what_to_do(model):
    with pytest.raises(sp.StructPruneError, match="data="):
        sp.slim(model, X, 0.5, criterion="gradient")


def test_bn_scale_is_the_absolute_gamma():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -3.0, 0.1, 2.0]))
    dg = sp.DependencyGraph(model, torch.randn(1, 2, 3, 3))
    group = next(g for g in dg.groups if ("0.weight", 0) in g.members)
    scores = get_criterion("bn_scale")(group, ScoringContext(model, dg))
    np.testing.assert_allclose(scores, [0.5, 3.0, 0.1, 2.0])
    small = sp.slim(model, torch.randn(1, 2, 3, 3), 0.5, criterion="bn_scale")
    assert sorted(small[1].weight.tolist()) == [-3.0, 2.0]


def test_random_is_seeded():
    model = TwoConvs()
    a = sp.slim(model, X, 0.5, criterion="random", seed=3)
    b = sp.slim(model, X, 0.5, criterion="random", seed=3)
    assert torch.equal(a.conv1.weight, b.conv1.weight)


class ResidualPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.bn0 = nn.BatchNorm2d(4)
        self.branch = nn.Conv2d(4, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        return self.head(x + self.bn1(self.branch(x)))


def test_scores_cover_every_member_of_a_residual_group():
    model = ResidualPair().eval()
    x = torch.randn(1, 3, 3, 3)
    dg = sp.DependencyGraph(model, x)
    group = next(g for g in dg.groups if ("stem.weight", 0) in g.members)
    seen = []

    def spy(group, ctx):
        seen.extend(space.tensor for space, _, _ in ctx.trainable_members(group))
        return get_criterion("l2")(group, ctx)

    sp.slim(model, x, 0.5, criterion=spy)
    expected = {"stem.weight", "stem.bias", "bn0.weight", "bn0.bias", "branch.weight", "branch.bias", "bn1.weight",
                "bn1.bias", "head.weight"}
    assert expected <= set(seen)
    # and the score moves when any single member changes
    base = get_criterion("l2")(group, ScoringContext(model, dg))
    for name in ["bn1.weight", "head.weight", "branch.weight"]:
        tweaked = ResidualPair().eval()
        tweaked.load_state_dict(model.state_dict())
        with torch.no_grad():
            dict(tweaked.named_parameters())[name].mul_(3)
        dg2 = sp.DependencyGraph(tweaked, x)
        group2 = next(g for g in dg2.groups if ("stem.weight", 0) in g.members)
        assert not np.allclose(get_criterion("l2")(group2, ScoringContext(tweaked, dg2)), base), name


def test_callable_criterion_sees_len_and_members():
    model = ResidualPair()
    calls = []

    def by_index(group, ctx):
        calls.append((len(group), list(group.members)))
        return torch.arange(len(group), dtype=torch.float64)

    small = sp.slim(model, torch.randn(1, 3, 3, 3), 0.5, criterion=by_index)
    assert calls and all(n == 4 for n, _ in calls)
    assert torch.equal(small.stem.weight, model.stem.weight[2:])
