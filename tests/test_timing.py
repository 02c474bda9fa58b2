"""Schedules (how often), soft pruning and lottery tickets (when), sparsity regularisers."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.workflows.schedules import increments


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# ---- schedules ------------------------------------------------------------------------------------------------
def test_schedules_yield_the_documented_cumulative_ratios():
    assert sp.OneShot().cumulative(0.7) == [0.7]
    assert sp.Iterative(5, "linear").cumulative(0.5) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    # Zhu & Gupta: s_t = s_f + (s_i - s_f) (1 - t/n)^3
    expected = [0.8 - 0.8 * (1 - t / 4) ** 3 for t in (1, 2, 3, 4)]
    assert sp.Iterative(4, "cubic").cumulative(0.8) == pytest.approx(expected)
    assert sp.Iterative(2, "cubic", initial=0.2).cumulative(0.6) == pytest.approx([0.6 - 0.4 * 0.125, 0.6])
    with pytest.raises(ValueError, match="curve"):
        sp.Iterative(3, "exponential")
    with pytest.raises(ValueError, match="steps"):
        sp.Iterative(0)


def test_increments_compose_to_the_cumulative_targets():
    targets = sp.Iterative(5, "cubic").cumulative(0.7)
    kept = 1.0
    for target, step in zip(targets, increments(targets)):
        kept *= 1 - step
        assert 1 - kept == pytest.approx(target)


def test_iterative_pruning_reaches_the_one_shot_widths_and_calls_back_between_steps():
    model = _convnet().eval()
    seen = []
    pruner = sp.Pruner(model, X, 0.7, schedule=sp.Iterative(4, "cubic"), progress=True)
    small = pruner.run(lambda p, step: seen.append((step.index, p.model[0].out_channels)))
    one_shot = sp.slim(model, X, 0.7)
    assert [i for i, _ in seen] == [1, 2, 3, 4]
    widths = [w for _, w in seen]
    assert widths == sorted(widths, reverse=True) and widths[0] < 16
    assert small[0].out_channels == one_shot[0].out_channels == 16 - int(0.7 * 16)
    assert small[3].out_channels == one_shot[3].out_channels
    assert model[0].out_channels == 16  # the caller's model is untouched


# ---- soft pruning -----------------------------------------------------------------------------------------------
def _masked_rows(conv):
    return (conv.weight.detach().flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()


def test_soft_pruning_masks_regrow_and_finalize_matches_the_masked_model():
    model = _convnet()
    with torch.no_grad():  # trained BN shifts are not zero; a zero shift before ReLU would pass no gradient
        model[1].bias.uniform_(0.1, 0.5)
        model[4].bias.uniform_(0.1, 0.5)
    soft = sp.SoftPruner(model, X, 0.5)
    first = _masked_rows(model[0])
    assert len(first) == 8 and soft.masked_fraction == pytest.approx(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(X), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not set(first) & set(_masked_rows(model[0]))  # masked filters were free to regrow
    soft.update()
    assert len(_masked_rows(model[0])) == 8  # re-selected and masked again
    model.eval()
    small = soft.finalize()
    assert small[0].out_channels == 8 and small[3].out_channels == 16
    torch.testing.assert_close(small(X), model(X), rtol=1e-5, atol=1e-6)


# ---- lottery tickets ---------------------------------------------------------------------------------------------
def _train(model, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(X), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_lottery_ticket_channel_survivors_are_rewound_to_their_initial_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(4, 6)
    ticket = sp.LotteryTicket(model, x)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    winner = ticket.prune_and_rewind(0.5)
    trained_small = sp.slim(model, x, 0.5, criterion="l1")
    assert winner[0].out_features == trained_small[0].out_features == 8
    for row, trained_row in enumerate(trained_small[0].weight.detach()):  # find each survivor by its values
        (i,) = [i for i in range(16) if torch.equal(model[0].weight.detach()[i], trained_row)]
        assert torch.equal(winner[0].weight.detach()[row], initial["0.weight"][i])
        assert torch.equal(winner[0].bias.detach()[row], initial["0.bias"][i])
        assert torch.equal(winner[2].weight.detach()[:, row], initial["2.weight"][:, i])
    assert torch.equal(winner[2].bias.detach(), initial["2.bias"])


def test_lottery_ticket_element_masks_keep_survivors_at_their_initial_values():
    model = _convnet()
    ticket = sp.LotteryTicket(model, X)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    _train(ticket.model)
    winner = ticket.prune_and_rewind(0.6, granularity="element")
    mask = winner[3].parametrizations.weight[0].mask  # the library's own Mask
    assert 0.3 < 1 - mask.mean().item() < 0.9  # global magnitude ranking: about 60 % overall
    torch.testing.assert_close(winner[3].weight, initial["3.weight"] * mask, rtol=0, atol=0)
    _train(winner, steps=2)
    assert (winner[3].weight[mask == 0] == 0).all()  # masks hold while retraining


# ---- regularisers ------------------------------------------------------------------------------------------------
def test_bn_l1_gradient_is_strength_times_the_sign_of_the_scales():
    model = _convnet()
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(-1, 1, 16))
    model.zero_grad()
    sp.regularizer(model, "bn_l1", 0.01).backward()
    torch.testing.assert_close(model[1].weight.grad, 0.01 * torch.sign(model[1].weight.detach()))
    assert model[0].weight.grad is None


def test_group_lasso_gradient_matches_the_hand_computed_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    model.zero_grad()
    value = sp.regularizer(model, "group_lasso", 0.5, example_input=x)
    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    norms = (w1.pow(2).sum(1) + b1.pow(2) + w2.pow(2).sum(0)).sqrt()  # one hidden unit = row, bias, column
    assert value.item() == pytest.approx(0.5 * norms.sum().item(), rel=1e-6)
    value.backward()
    torch.testing.assert_close(model[0].weight.grad, 0.5 * w1 / norms[:, None])
    torch.testing.assert_close(model[0].bias.grad, 0.5 * b1 / norms)
    torch.testing.assert_close(model[2].weight.grad, 0.5 * w2 / norms[None, :])
    assert model[2].bias.grad is None  # the output layer's channels are not prunable
    model.zero_grad()
    sp.regularizer(model, "group_lasso", 0.5).backward()  # the groups are remembered per model
    torch.testing.assert_close(model[0].bias.grad, 0.5 * b1 / norms)


def test_regularizer_errors_are_specific():
    with pytest.raises(ValueError, match="kind"):
        sp.regularizer(_convnet(), "l0", 1.0)
    with pytest.raises(ValueError, match="example_input"):
        sp.regularizer(_convnet(), "group_lasso", 1.0)
    with pytest.raises(ValueError, match="BatchNorm"):
        sp.regularizer(nn.Linear(2, 2), "bn_l1", 1.0)


def test_late_rewinding_uses_the_snapshot_taken_at_iteration_k():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(4, 6)
    ticket = sp.LotteryTicket(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    ticket.snapshot()  # iteration k = 1
    at_k = model[0].weight.detach().clone()
    for _ in range(4):
        step()
    winner = ticket.prune_and_rewind(0.5, granularity="element")
    mask = winner[0].parametrizations.weight[0].mask
    torch.testing.assert_close(winner[0].weight, at_k * mask, rtol=0, atol=0)
