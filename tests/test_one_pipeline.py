"""One pipeline, one scoring system, one mask mechanism: the drifts the architecture review measured,
each pinned by a test, and a registered criterion used by every entry point."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import Small, X

import structprune as sp

BATCHES = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]


def _net(seed: int = 0) -> Small:
    torch.manual_seed(seed)
    return Small(width=16).eval()


def _conv_width(model: nn.Module) -> int:
    return model.conv.out_channels


# ---- a registered criterion works in slim, sparsify, SoftPruner and the regulariser -------------------------------
def test_a_registered_criterion_is_used_by_every_entry_point():
    calls = []

    def by_index(group, context):
        """Keep the channels with the highest index: a ranking no built-in criterion gives."""
        calls.append(group.id)
        return np.arange(group.n_units, dtype=float)

    def by_index_elements(name, tensor, context):
        return torch.arange(tensor.numel(), dtype=torch.float32).reshape(tensor.shape)

    sp.register_criterion("by_index", element=by_index_elements)(by_index)
    assert "by_index" in sp.list_criteria() and "by_index" in sp.list_criteria(element=True)

    small, report = sp.slim_with_report(_net(), X, 0.5, criterion="by_index")
    conv_group = report.graph.groups[next(iter(report.plan.drops))]
    assert calls and set(report.plan.drops[conv_group.id].tolist()) == set(range(len(report.plan.drops[
        conv_group.id])))  # the lowest indices went

    model = _net()
    sp.sparsify(model, 0.5, "channel", example_input=X, criterion="by_index")
    kept = model.conv.parametrizations.weight[0].mask.flatten(1).any(1)
    assert kept.tolist() == [False] * 8 + [True] * 8

    model = _net()
    report = sp.sparsify(model, 0.25, "element", criterion="by_index")
    assert (model.fc.weight.flatten()[:16] == 0).all() and report.total == pytest.approx(0.25, abs=0.01)

    soft = sp.SoftPruner(_net(), X, 0.5, criterion="by_index")
    assert (soft.model.conv.weight[:8] == 0).all() and (soft.model.conv.weight[8:] != 0).any()

    model = _net()
    targeted = sp.regularizer(model, "group_lasso", 1.0, example_input=X, criterion="by_index", ratio=0.5)
    everything = sp.regularizer(_net(), "group_lasso", 1.0, example_input=X)
    assert 0 < targeted.item() < everything.item()
    targeted.backward()
    assert model.conv.weight.grad[8:].abs().sum() == 0 and model.conv.weight.grad[:8].abs().sum() > 0


# ---- drifts the review measured ----------------------------------------------------------------------------------
def test_sparsify_gradient_criteria_leave_batchnorm_statistics_alone():
    model = _net().train()
    before = model.bn.running_mean.clone(), model.bn.num_batches_tracked.clone()
    sp.sparsify(model, 0.5, criterion="taylor", data=BATCHES)
    assert torch.equal(model.bn.running_mean, before[0]) and torch.equal(model.bn.num_batches_tracked, before[1])
    assert model.training  # the model's own mode is restored


def test_taylor_means_the_same_at_element_and_channel_level():
    """An element's Taylor score is the per-batch |w * dL/dw|, summed over batches: the channel score of a
    one-element channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1, bias=False), nn.Flatten(0))
    batches = [(torch.randn(5, 3), torch.randn(5)) for _ in range(3)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    ctx = sp.ScoringContext(model, None, data=batches, loss_fn=loss)
    element = sp.get_criterion("taylor").element_scores("0.weight", model[0].weight, ctx)
    expected = torch.zeros(1, 3)
    for inputs, targets in batches:
        grad, = torch.autograd.grad(loss(model, (inputs, targets)), [model[0].weight])
        expected += (grad * model[0].weight.detach()).abs()
    assert torch.allclose(element, expected.double() if element.dtype == torch.float64 else expected, rtol=1e-5)


def test_lottery_ticket_element_masks_are_the_librarys_masks():
    model = _net()
    ticket = sp.LotteryTicket(model, X)
    with torch.no_grad():
        model.conv.weight.mul_(3)  # "training"
    winner = ticket.prune_and_rewind(0.5, granularity="element")
    report = sp.sparsity_report(winner)
    assert len(report.rows) == 3 and report.total == pytest.approx(0.5, abs=0.01)
    baked = sp.remove_masks(winner)
    assert not hasattr(baked.conv, "parametrizations") and float((baked.conv.weight == 0).float().mean()) > 0


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, scale=1.0):
        return self.fc2(torch.relu(self.fc1(x))) * scale


def test_apply_masks_takes_every_input_form_slim_takes():
    model = KeywordNet().eval()
    sp.sparsify(model, 0.5, "channel", example_input={"x": torch.randn(2, 8)})
    small = sp.apply_masks(model, {"x": torch.randn(2, 8)})
    assert small.fc1.out_features == 8
    x = torch.randn(3, 8)
    assert torch.allclose(small(x), model(x), atol=1e-6)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_trace_options_reach_every_entry_point(tracer):
    """The tracer chosen by the caller is the one every front end's graph was captured with."""
    graphs = []
    original = sp.DependencyGraph.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        graphs.append(self.trace.tracer)

    sp.DependencyGraph.__init__ = spy
    try:
        sp.slim(_net(), X, 0.3, tracer=tracer)
        sp.SoftPruner(_net(), X, 0.3, tracer=tracer)
        sp.LotteryTicket(_net(), X).prune_and_rewind(0.3, tracer=tracer)
        sp.sparsify(_net(), 0.3, "channel", example_input=X, tracer=tracer)
        sp.regularizer(_net(), "group_lasso", 1e-4, example_input=X, tracer=tracer)
        list(sp.Pruner(_net(), X, 0.3, tracer=tracer))
        masked = _net()
        sp.sparsify(masked, 0.3, "channel", example_input=X)
        graphs.clear()
        sp.apply_masks(masked, X, tracer=tracer)
    finally:
        sp.DependencyGraph.__init__ = original
    assert graphs and set(graphs) == {tracer}


def test_ignore_reaches_soft_pruning_and_channel_masks():
    soft = sp.SoftPruner(_net(), X, 0.5, ignore=["conv"])
    assert (soft.model.conv.weight.flatten(1).abs().sum(1) > 0).all()
    model = _net()
    sp.sparsify(model, 0.5, "channel", example_input=X, ignore=[nn.Conv2d])
    assert not hasattr(model.conv, "parametrizations") or model.conv.parametrizations.weight[0].mask.all()


def test_soft_pruner_finalize_is_verified_against_the_masked_model():
    soft = sp.SoftPruner(_net(), X, 0.5)
    small = soft.finalize()
    assert _conv_width(small) == 8
    with torch.no_grad():
        assert torch.allclose(small(X), soft.model(X), atol=1e-5)


def test_the_pipeline_session_runs_stage_by_stage():
    model = _net()
    session = sp.PruningSession(model, X, sp.Options.from_kwargs(ratio=0.5, scope="global"))
    plan = session.plan()
    small, verdict = session.apply(plan)
    assert verdict.passed and verdict.exact and sp.count_parameters(small) < sp.count_parameters(model)


# ---- review findings on the front ends, pinned -------------------------------------------------------------------
def test_group_lasso_honours_planning_options_and_caches_inline_ones():
    model = _net()
    everything = sp.regularizer(model, "group_lasso", 1.0, example_input=X)
    ignoring = sp.regularizer(model, "group_lasso", 1.0, example_input=X, ignore=["conv"])
    assert ignoring.item() < everything.item()
    # an inline list is the same option every training step: no example_input needed after the first call
    again = sp.regularizer(model, "group_lasso", 1.0, ignore=["conv"])
    assert again.item() == pytest.approx(ignoring.item())
    with pytest.raises(sp.InvalidOptionError, match="has no option 'verify'"):
        sp.regularizer(model, "group_lasso", 1.0, example_input=X, verify=True)


def test_front_end_keywords_cannot_be_smuggled_in_as_options():
    with pytest.raises(sp.InvalidOptionError, match="no option 'caller'"):
        sp.slim(_net(), X, 0.5, caller="x")
    with pytest.raises(sp.InvalidOptionError, match="no option 'allowed'"):
        sp.slim(_net(), X, 0.5, allowed=["tracer"])


@pytest.mark.parametrize("seed", [-1, 2 ** 40, 1.5])
def test_seeds_the_generators_cannot_take_are_refused(seed):
    with pytest.raises(sp.InvalidOptionError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        sp.slim(_net(), X, 0.5, criterion="random", seed=seed)


def test_numpy_and_tensor_scalars_are_valid_numbers():
    assert sp.Iterative(steps=np.int64(3)).steps == 3
    small = sp.slim(_net(), X, torch.tensor(0.5))
    assert _conv_width(small) == 8
    sp.sparsify(_net(), granularity="nm", n=np.int64(2), m=np.int64(4))
    assert sp.regularizer(_net(), "bn_l1", torch.tensor(1e-3)).item() > 0


def test_a_single_target_glob_is_one_pattern_not_its_characters():
    model = _net()
    report = sp.sparsify(model, 0.5, targets="fc.*")
    assert [row[0] for row in report.rows] == ["fc.bias", "fc.weight"] or [row[0] for row in report.rows] == [
        "fc.weight", "fc.bias"]


def test_iterative_element_tickets_count_earlier_masks():
    model = _net()
    ticket = sp.LotteryTicket(model, X)
    first = ticket.prune_and_rewind(0.5, granularity="element")
    second = sp.LotteryTicket(first, X).prune_and_rewind(0.75, granularity="element")
    assert sp.sparsity_report(second).total == pytest.approx(0.75, abs=0.01)
    local = ticket.prune_and_rewind(0.5, granularity="element", scope="local")
    assert all(zeros / size == pytest.approx(0.5, abs=0.02) for _, _, _, size, zeros in
               sp.sparsity_report(local).rows)
    with pytest.raises(sp.InvalidOptionError, match=r"prune_and_rewind\(granularity='element'\) has no option"):
        ticket.prune_and_rewind(0.5, granularity="element", ignore=["conv"])


def test_options_an_entry_point_cannot_honour_are_refused():
    with pytest.raises(sp.InvalidOptionError, match="SoftPruner\\(\\) has no option 'inplace'"):
        sp.SoftPruner(_net(), X, 0.5, inplace=True)
    with pytest.raises(sp.InvalidOptionError, match="prune_and_rewind\\(\\) has no option 'verify'"):
        sp.LotteryTicket(_net(), X).prune_and_rewind(0.5, verify=True)
    with pytest.raises(sp.InvalidOptionError, match="sparsify\\(\\) has no option 'target'"):
        sp.sparsify(_net(), 0.5, "channel", example_input=X, target={"params": 0.3})


def test_replacing_options_checks_names_first_and_keeps_the_ratio():
    options = sp.Options.from_kwargs(ratio=0.3, target={"params": 0.2})
    assert options.replace(target=None).plan.ratio == 0.3
    with pytest.raises(sp.InvalidOptionError, match="did you mean 'scope'"):
        options.replace(scop="nowhere")
