"""Bias compensation: removed input channels keep contributing their calibration mean, through a bias."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structprune as sp
from tests.helpers import tiny_llama


class PositiveMLP(nn.Module):
    """Hidden channels with large positive means (ReLU of a shifted pre-activation), read by fc2."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4, bias=False)
        with torch.no_grad():
            self.fc1.bias.uniform_(1.0, 3.0)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return PositiveMLP().eval(), [torch.randn(64, 8) for _ in range(4)]


def _mean_held(model, data, layer, gone):
    """The original model with ``layer``'s removed inputs held at their calibration means (hooks)."""
    inputs = []
    handle = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        for batch in data:
            model(batch)
    handle.remove()
    mean = torch.cat(inputs).mean(0)

    def hold(module, args):
        x = args[0].clone()
        x[:, gone] = mean[gone]
        return (x,)

    return hold


def test_the_pruned_model_is_the_original_with_removed_inputs_held_at_their_means(mlp):
    model, data = mlp
    small, report = sp.slim_with_report(model, data[0], 0.5, data=data, round_to=None)
    assert report.verification is not None and report.verification.passed and report.verification.exact
    assert small.fc2.bias is not None and model.fc2.bias is None  # added to the copy only
    kept = torch.isin(model.fc1.weight, small.fc1.weight).all(1)  # rows of fc1 the copy still has
    handle = model.fc2.register_forward_pre_hook(_mean_held(model, data, model.fc2, ~kept))
    x = torch.randn(16, 8)
    with torch.no_grad():
        expected = model(x)
    handle.remove()
    torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-5)


def test_compensation_cuts_the_error_of_removing_channels_with_a_nonzero_mean(mlp):
    model, data = mlp
    held_out = torch.randn(256, 8)
    errors = {}
    for compensate in (True, False):
        small = sp.slim(model, data[0], 0.5, data=data, compensate=compensate, round_to=None)
        assert (small.fc2.bias is not None) == compensate
        with torch.no_grad():
            errors[compensate] = ((small(held_out) - model(held_out)).norm() / model(held_out).norm()).item()
    assert errors[True] < errors[False] / 3


def test_convolutions_are_compensated_only_where_a_constant_input_stays_constant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].bias.fill_(1.0)
        model[2].bias.fill_(1.0)
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    small, report = sp.slim_with_report(model, data[0], 0.5, data=data, round_to=None)
    assert report.verification is not None and report.verification.passed and report.verification.exact
    # the 1x1 conv reads the first conv's removed channels: folded; the padded 3x3 conv's border would not
    # see a constant, so its removed inputs read zero as without compensation
    reference = sp.slim(model, data[0], 0.5, data=data, round_to=None, compensate=False)
    assert not torch.equal(small[2].bias, reference[2].bias)
    assert torch.equal(small[4].bias, reference[4].bias)


def test_a_llama_gets_biases_its_config_can_express_and_the_caller_keeps_its_own():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    data = [torch.randint(0, 100, (2, 16)) for _ in range(3)]
    small, report = sp.slim_with_report(model, data[0], 0.3, criterion="flap", data=data, hidden=False)
    assert report.verification is not None and report.verification.passed
    mlp = small.model.layers[0].mlp
    assert small.config.mlp_bias and not model.config.mlp_bias and model.model.layers[0].mlp.down_proj.bias is None
    assert mlp.down_proj.bias is not None and mlp.down_proj.bias.abs().sum() > 0
    assert torch.equal(mlp.gate_proj.bias, torch.zeros_like(mlp.gate_proj.bias))  # siblings the flag governs



def test_a_compensated_llama_survives_save_pretrained_and_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    data = [torch.randint(0, 100, (2, 16)) for _ in range(3)]
    small = sp.slim(model, data[0], 0.3, criterion="flap", data=data, hidden=False, attention="heads",
                    ignore=["*self_attn*"])
    small.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, small(x).logits)


def test_without_data_only_constant_channels_are_folded_and_compensate_false_folds_nothing(mlp):
    model, data = mlp
    assert sp.slim(model, data[0], 0.5).fc2.bias is None
    assert sp.slim(model, data[0], 0.5, data=data, compensate=False).fc2.bias is None
    with pytest.raises(sp.StructPruneError, match="compensate"):
        sp.slim(model, data[0], 0.5, compensate="yes")


class DeadChannels(nn.Module):
    """stem conv -> BN -> activation -> chunk in two -> each half through a 1x1 conv -> concat -> 1x1 head.

    ``dead`` stem channels have zero filters and a zero BN scale, so their activation is act(BN shift):
    a constant that is not zero (sigmoid(0) = 0.5, a Network-Slimming BN whose shift survived)."""

    def __init__(self, width: int, dead: list, activation: str, shifts: list):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.act = {"sigmoid": nn.Sigmoid(), "relu": nn.ReLU(), "gelu": nn.GELU()}[activation]
        self.left = nn.Conv2d(width // 2, 6, 1)
        self.right = nn.Conv2d(width - width // 2, 6, 1, bias=False)
        self.head = nn.Conv2d(12, 4, 1)
        with torch.no_grad():
            for channel, shift in zip(dead, shifts):
                self.stem.weight[channel] = 0
                self.stem.bias[channel] = 0
                self.bn.weight[channel] = 0
                self.bn.bias[channel] = shift
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        a, b = self.act(self.bn(self.stem(x))).chunk(2, dim=1)
        return self.head(torch.cat([self.left(a), self.right(b)], dim=1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.sampled_from([8, 12, 16]), activation=st.sampled_from(["sigmoid", "relu", "gelu"]),
       data=st.data(), seed=st.integers(0, 2 ** 16))
def test_removing_dead_channels_with_a_constant_activation_is_exact(width, activation, data, seed):
    torch.manual_seed(seed)
    # chunk ties position p of each half (a unit is a pair p, p + width/2): kill both channels of a pair
    pairs = data.draw(st.lists(st.integers(0, width // 2 - 1), min_size=1, max_size=width // 4, unique=True))
    dead = pairs + [p + width // 2 for p in pairs]
    shifts = data.draw(st.lists(st.floats(0.2, 2.0), min_size=len(dead), max_size=len(dead)))
    model = DeadChannels(width, dead, activation, shifts).eval()

    def dead_first(group, context):  # the dead channels score lowest, so exactly they go
        scores = torch.ones(group.n_units)
        if ("stem.weight", 0) in group.members:
            index = dict(zip(group.members, group.unit_index))[("stem.weight", 0)]
            scores[torch.as_tensor(index[dead])] = 0
        return scores.numpy()

    small, report = sp.slim_with_report(model, torch.randn(2, 3, 8, 8), len(dead) / width, criterion=dead_first,
                                        round_to=None, ignore=["left", "right", "head"])
    assert report.verification is not None and report.verification.passed
    assert small.stem.out_channels == width - len(dead)
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
