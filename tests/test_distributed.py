"""Gradient criteria under torch.distributed: every rank prunes identically (2 CPU processes, gloo)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import structprune as sp
from tests.helpers import free_port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(rank: int):
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(2)]


def _kept(model, small):
    return [[i for i, row in enumerate(model[k].weight) if any(torch.equal(row, r) for r in small[k].weight)]
            for k in (0, 2)]


def _worker(rank: int, world: int, port: int, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model()
        small = sp.slim(model, torch.randn(2, 6), 0.5, criterion="taylor", data=_batches(rank))
        results[rank] = _kept(model, small)
    finally:
        dist.destroy_process_group()


def test_taylor_scores_are_all_reduced_across_ranks():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, free_port(), results), nprocs=2, join=True)
    assert results[0] == results[1]
    model = _model()  # one process over every rank's batches reaches the same decision
    together = sp.slim(model, torch.randn(2, 6), 0.5, criterion="taylor", data=_batches(0) + _batches(1))
    assert results[0] == _kept(model, together)
    alone = [_kept(model, sp.slim(model, torch.randn(2, 6), 0.5, criterion="taylor", data=_batches(r)))
             for r in (0, 1)]
    assert alone[0] != alone[1], "the two ranks' data should disagree on their own (else the test proves nothing)"
