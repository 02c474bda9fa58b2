"""Activation-aware criteria (Wanda, FLAP's fluctuation) pinned on hand-computed examples, and their
statistics streamed batch by batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import structprune as sp
from structprune.scoring.activations import ActivationCollector
from structprune.scoring.criteria import ScoringContext, get_criterion
from tests.helpers import tiny_llama


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _hidden_scores(model, x, criterion, data):
    dg = sp.DependencyGraph(model, x)
    group = next(g for g in dg.groups if ("fc1.weight", 0) in g.members)
    return np.asarray(get_criterion(criterion)(group, ScoringContext(model, dg, data=data)))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MLP().eval()
    # one input feature carries activations 100x the others, as LLM outlier features do
    batches = [torch.randn(5, 4, 6) * torch.tensor([100.0, 1, 1, 1, 1, 1]) for _ in range(3)]
    inputs = torch.cat(batches).reshape(-1, 6)
    hidden = torch.relu(model.fc1(inputs)).detach()
    return model, batches, inputs.double(), hidden.double()


def test_statistics_are_streamed_and_equal_those_of_all_the_data(setup):
    model, batches, inputs, hidden = setup
    stats = ActivationCollector(model).collect(batches)
    assert stats["fc1.weight"].count == 60 and stats["fc1.weight"].axis == 1
    torch.testing.assert_close(stats["fc1.weight"].mean, inputs.mean(0))
    torch.testing.assert_close(stats["fc2.weight"].variance, hidden.var(0, unbiased=False))
    torch.testing.assert_close(stats["fc2.weight"].norm, hidden.norm(dim=0))
    assert not model.fc1._forward_pre_hooks and not model.fc2._forward_pre_hooks  # nothing left behind


def test_wanda_is_weight_magnitude_times_input_norm_over_the_unit(setup):
    model, batches, inputs, hidden = setup
    w1, w2 = model.fc1.weight.detach().double(), model.fc2.weight.detach().double()
    rows = (w1.abs() * inputs.norm(dim=0)).sum(1)  # fc1's filter j reads every input feature
    cols = (w2.abs() * hidden.norm(dim=0)).sum(0)  # fc2's column j reads hidden channel j
    expected = (rows + cols) / 2  # mean over the two members
    np.testing.assert_allclose(_hidden_scores(model, inputs[:1].float(), "wanda", batches), expected.numpy(),
                               rtol=1e-5)


def test_flap_is_input_variance_times_squared_weight_norm(setup):
    model, batches, inputs, hidden = setup
    w2 = model.fc2.weight.detach().double()
    expected = hidden.var(0, unbiased=False) * w2.square().sum(0)  # only fc2 reads the channel as an input
    np.testing.assert_allclose(_hidden_scores(model, inputs[:1].float(), "flap", batches), expected.numpy(),
                               rtol=1e-5)


def test_wanda_follows_outlier_features_that_magnitude_misses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight.normal_(0, 1)
        model[0].weight[:4] *= 0.1  # filters 0-3 are small in weight ...
        model[0].bias.zero_()
        model[0].weight[:4, 0] = 0.5  # ... but read feature 0, which is huge in the data
        model[0].weight[4:, 0] = 0.0
    data = [torch.randn(16, 8) * torch.tensor([50.0] + [1.0] * 7) for _ in range(2)]
    small_l2 = sp.slim(model, data[0], 0.5, criterion="l2", round_to=None)
    small_wanda = sp.slim(model, data[0], 0.5, criterion="wanda", data=data, round_to=None)
    x = torch.cat(data)
    error = {name: ((small(x) - model(x)).norm() / model(x).norm()).item()
             for name, small in (("l2", small_l2), ("wanda", small_wanda))}
    assert error["wanda"] < error["l2"] / 2


def test_grouped_convolutions_read_their_own_groups_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 2, 1)).eval()
    batches = [torch.randn(2, 3, 5, 5) for _ in range(2)]
    stats = ActivationCollector(model).collect(batches)["2.weight"]
    hidden = torch.cat([torch.relu(model[0](b)) for b in batches]).detach()
    norms = hidden.movedim(1, -1).reshape(-1, 4).norm(dim=0)
    torch.testing.assert_close(stats.norm.float(), norms)
    dg = sp.DependencyGraph(model, batches[0])
    ctx = ScoringContext(model, dg, data=batches)
    group = next(g for g in dg.groups if ("2.weight", 0) in g.members)
    w = model[2].weight.detach()  # (4 out, 2 in per group, 3, 3): filters 0-1 read channels 0-1, 2-3 read 2-3
    expected_rows = torch.stack([(w[o].abs() * norms[2 * (o // 2):2 * (o // 2) + 2, None, None]).sum()
                                 for o in range(4)])
    expected_cols = (model[4].weight.detach().abs()[:, :, 0, 0] * ActivationCollector(model).collect(batches)[
        "4.weight"].norm.float()).sum(0)
    # a grouped conv's unit is one position in every group (channels 0 and 2, 1 and 3): bincount by unit
    index = dict(zip(group.members, group.unit_index))
    expected = (np.bincount(index[("2.weight", 0)], weights=expected_rows.double().numpy())
                + np.bincount(index[("4.weight", 1)], weights=expected_cols.double().numpy())) / 2
    np.testing.assert_allclose(get_criterion("wanda")(group, ctx), expected, rtol=1e-4)


def test_activation_criteria_without_data_say_what_to_do(setup):
    model, batches, *_ = setup
    for criterion in ("wanda", "flap"):
        with pytest.raises(sp.StructPruneError, match="data="):
            sp.slim(model, batches[0], 0.5, criterion=criterion)


def test_activation_criteria_prune_a_llama_with_token_batches_and_verification():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    data = [torch.randint(0, 100, (2, 16)) for _ in range(2)]
    for criterion in ("wanda", "flap"):
        small, report = sp.slim_with_report(model, data[0], 0.3, criterion=criterion, data=data)
        assert report.verification is not None and report.verification.passed
        assert small.model.layers[0].mlp.gate_proj.out_features < 128


def test_pruning_a_language_model_by_weights_alone_warns_and_says_how_to_pass_data():
    pytest.importorskip("transformers")
    import warnings

    torch.manual_seed(0)
    model = tiny_llama(layers=1)
    tokens = torch.randint(0, 100, (1, 8))
    with pytest.warns(UserWarning, match=r"weights alone .* data=\[tokens"):
        sp.slim(model, tokens, 0.3, hidden=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sp.slim(model, tokens, 0.3, hidden=False, criterion="flap", data=[tokens])  # calibrated: no warning
        sp.slim(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4), 0.5)  # not an LM
