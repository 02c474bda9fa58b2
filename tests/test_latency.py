"""Latency targets: the table, the allocation and the landing, on a deterministic clock.

Real timings are noisy on a shared CI machine, and performance claims belong in benchmarks/
(benchmarks/cpu_latency.py measures the real thing). Here the clock is replaced by one that
charges every forward its multiply-accumulates, so every assertion is exact and could fail.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune as sp
import structprune.planning.latency as latency
from structprune.options import Options
from structprune.pipeline import PruningSession
from structprune.tools.metrics import count_macs


class Ladder(nn.Module):
    """An early wide-resolution conv (much time per parameter) and a late low-resolution one (little)."""

    def __init__(self):
        super().__init__()
        self.early = nn.Conv2d(3, 64, 3, padding=1)
        self.early2 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(4)
        self.late = nn.Conv2d(64, 256, 3, padding=1)
        self.late2 = nn.Conv2d(256, 256, 3, padding=1)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        x = torch.relu(self.early2(torch.relu(self.early(x))))
        x = torch.relu(self.late2(torch.relu(self.late(self.pool(x)))))
        return self.head(x.mean((2, 3)))


X = torch.randn(1, 3, 32, 32)


def _macs_clock(module, args=(), kwargs=None, **_):
    return 1e-9 * count_macs(module, tuple(args) if not kwargs else dict(kwargs))


def _macs_ratio(candidate, reference, args=(), kwargs=None, **_):
    return _macs_clock(candidate, args, kwargs) / _macs_clock(reference, args, kwargs)


@pytest.fixture
def macs_clock(monkeypatch, tmp_path):
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path))
    calls = []

    def clock(*args, **kwargs):
        calls.append(1)
        return _macs_clock(*args, **kwargs)

    monkeypatch.setattr(latency, "time_forward", clock)
    monkeypatch.setattr(latency, "paired_ratio", _macs_ratio)
    return calls


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_latency_target_lands(macs_clock, fraction):
    model = Ladder().eval()
    small, report = sp.slim_with_report(model, X, target={"latency": fraction})
    assert report.verification.passed
    assert f"latency target {fraction:.0%}: the plan measured" in str(report)
    achieved = 1 - count_macs(small, X) / count_macs(model, X)
    assert abs((1 - achieved) / (1 - fraction) - 1) <= 0.05, achieved


def test_latency_goes_where_it_is_cheap(macs_clock):
    """At the same latency, the latency-aware plan keeps more parameters than a uniform ratio: the early
    layers cost much time for few parameters, so they shrink first (the HALP effect)."""
    model = Ladder().eval()
    aware = sp.slim(model, X, target={"latency": 0.5}, verify=False)
    uniform = sp.slim(model, X, target={"macs": 0.5}, verify=False)  # the uniform ratio at the same MACs
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(aware) > 1.3 * params(uniform)
    assert aware.early2.out_channels < aware.late2.out_channels * 64 / 256


def test_the_table_is_cached_on_disk(macs_clock):
    model = Ladder().eval()
    session = PruningSession(model, X, Options.from_kwargs(target={"latency": 0.5}))
    planner, options = session.planner(), session.options.plan
    first = latency.LatencyTable(session.graph, planner, options)
    measured = len(macs_clock)
    assert measured > 0 and len(first.leaves) == 5  # four convs and the head
    second = latency.LatencyTable(session.graph, planner, options)
    assert len(macs_clock) == measured  # nothing timed again
    assert {k: leaf.seconds for k, (leaf, _) in first.leaves.items()} == \
        {k: leaf.seconds for k, (leaf, _) in second.leaves.items()}


def test_an_unreachable_latency_target_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(latency, "time_forward", _macs_clock)
    monkeypatch.setattr(latency, "paired_ratio", lambda *a, **k: 1.0)  # pruning never makes it faster
    with pytest.raises(sp.StructPruneError, match="cannot reach the latency target"):
        sp.slim(Ladder().eval(), X, target={"latency": 0.5})


def test_paired_ratio_is_the_ratio_of_fastest_blocks_and_adds_pairs_until_settled(monkeypatch):
    from structprune.tools import timing

    candidate, reference = nn.Identity(), nn.ReLU()

    def runner(times):
        values = iter(times)
        return timing._Runner(lambda: next(values), lambda: None)

    def pairing(candidate_times, reference_times):
        runners = {id(candidate): runner(candidate_times), id(reference): runner(reference_times)}
        monkeypatch.setattr(timing, "_runner", lambda module, *a, **k: runners[id(module)])

    monkeypatch.setattr(timing._Runner, "block", lambda self: self.run())
    # interference slows some blocks of each model down; the fastest of each is what they cost
    pairing([1.3, 0.6, 0.9, 0.5, 0.8, 0.7, 0.9, 0.6, 0.5, 0.7], [2.0, 1.5, 1.0, 1.2, 1.9, 1.1, 1.0, 1.4, 1.3, 1.0])
    assert timing.paired_ratio(candidate, reference, pairs=6) == pytest.approx(0.5)
    # with a precision, pairs are added while new fastest blocks still move the ratio
    pairing([1.0] * 4 + [0.8] + [1.0] * 30, [1.0] * 35)
    calls = []
    settled = timing._settled
    monkeypatch.setattr(timing, "_settled", lambda e, p: calls.append(len(e)) or settled(e, p))
    assert timing.paired_ratio(candidate, reference, pairs=3, precision=0.01) == pytest.approx(0.8)
    assert max(calls) == 8  # the ratio moved at pair 5: settled once it is the whole last half (pairs 5-8)
    # an unreachable precision stops at the cap
    calls.clear()
    pairing([1.0, 0.5] * 10, [1.0] * 20)
    monkeypatch.setattr(timing, "_settled", lambda e, p: calls.append(len(e)) or False)
    timing.paired_ratio(candidate, reference, pairs=2, precision=1e-9, max_pairs=6)
    assert max(calls) == 5  # checked up to 5 pairs, stopped at the cap of 6


def test_a_latency_target_keeps_the_ratios_given_per_layer(macs_clock):
    # ratios= fixes those layers exactly; the latency search allocates the rest and still lands
    model = Ladder().eval()
    small = sp.slim(model, X, target={"latency": 0.5}, ratios={"early": 0.0, "late": 0.5}, round_to=None)
    assert small.early.out_channels == 64  # the cheapest latency of all, but fixed to keep everything
    assert small.late.out_channels == 128
    achieved = 1 - count_macs(small, X) / count_macs(model, X)
    assert abs((1 - achieved) / 0.5 - 1) <= 0.05, achieved
