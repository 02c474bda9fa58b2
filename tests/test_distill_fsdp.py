"""sp.distill(parallel="fsdp"): two gloo processes on the CPU shard student and teacher with FSDP2, each
holding half of the weights, and train exactly as one process does on both ranks' batches; a checkpoint
written sharded resumes (sharded or in one process) to the same weights, in the one-process format."""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import structprune as sp
from tests.helpers import assert_unchanged, free_port, snapshot, tiny_llama

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

STEPS = 4
OPTIONS = dict(steps=STEPS, lr=3e-3)  # grad_clip=1.0 (the default) clips: the global norm over shards counts
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _teacher():
    return tiny_llama(layers=3, initializer_range=0.2)


def _student():
    return tiny_llama(layers=2, tie_word_embeddings=True)  # tied: the checkpoint must store them once


def _rank_batches(rank: int):
    generator = torch.Generator().manual_seed(50 + rank)
    return [torch.randint(0, 100, (2, 12), generator=generator) for _ in range(STEPS)]


def _whole_batches():
    """What one process sees per step: both ranks' batches together (equal sizes, so the mean loss over all
    positions is the mean of the two ranks' losses, and FSDP's averaged gradients are its gradients)."""
    return [torch.cat(pair) for pair in zip(_rank_batches(0), _rank_batches(1))]


def _measuring(fractions: dict):
    """A forward= that records, inside the rank, the fraction of each sharded model's parameters it holds."""
    from torch.distributed.tensor import DTensor

    def forward(model, batch):
        params = list(model.parameters())
        if all(isinstance(p, DTensor) for p in params):
            role = "student" if any(p.requires_grad for p in params) else "teacher"
            fractions[role] = sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)
        return model(input_ids=batch)
    return forward


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, folder: str, results):
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a rank left waiting fails instead of hanging
    try:
        torch.set_num_threads(1)
        teacher = _teacher()
        kept = snapshot(teacher)
        student = _student()
        fractions: dict = {}
        straight = sp.distill(student, teacher, _rank_batches(rank), parallel="fsdp", forward=_measuring(fractions),
                              **OPTIONS)
        plain = (type(student) is transformers.LlamaForCausalLM
                 and not any(isinstance(p, DTensor) for p in student.parameters())
                 and student.lm_head.weight is student.model.embed_tokens.weight)
        assert_unchanged(teacher, kept)

        first = sp.distill(_student(), teacher, _rank_batches(rank), parallel="fsdp", checkpoint=folder,
                           checkpoint_every=1, **{**OPTIONS, "steps": 2})
        if rank == 0:  # the step-2 checkpoint, kept for a one-process resume in the test
            shutil.copytree(folder, folder + "-at-2")
        resumed = _student()
        second = sp.distill(resumed, teacher, _rank_batches(rank), parallel="fsdp", checkpoint=folder,
                            checkpoint_every=1, **OPTIONS)
        timed = sp.distill(_student(), teacher, _rank_batches(rank), parallel="fsdp", steps=STEPS,
                           max_seconds=1e-9 if rank == 0 else 1e6)  # only rank 0 runs out of time
        results[rank] = {"timed": (timed.steps, timed.stopped), "losses": straight.losses,
                         "weights": _weights(student), "fractions": fractions,
                         "plain": plain, "first": (first.steps, first.losses), "second": second,
                         "resumed": _weights(resumed)}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process runs (one spawn for every test here) and one process on both ranks' batches."""
    folder = tmp_path_factory.mktemp("fsdp") / "checkpoint"
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, free_port(), str(folder), results), nprocs=2, join=True)
    alone = _student()
    whole = sp.distill(alone, _teacher(), _whole_batches(), **OPTIONS)
    return {"ranks": [results[0], results[1]], "folder": folder, "alone": _weights(alone), "whole": whole}


def test_two_fsdp_processes_hold_half_each_and_train_as_one_process_on_both_batches(runs):
    alone, whole = runs["alone"], runs["whole"]
    initial = _weights(_student())
    for rank in runs["ranks"]:
        for role in ("student", "teacher"):
            assert 0.4 <= rank["fractions"][role] <= 0.6, (role, rank["fractions"])
        assert rank["plain"], "the caller's student comes back as itself, with plain tensors and its tied weights"
        assert rank["losses"] == pytest.approx(whole.losses, rel=TOLERANCE["rtol"], abs=TOLERANCE["atol"])
        assert rank["weights"].keys() == alone.keys()
        for name, value in alone.items():
            torch.testing.assert_close(rank["weights"][name], value, **TOLERANCE, msg=name)
            assert not torch.equal(value, initial[name]), f"{name} did not train"
    first, second = runs["ranks"]
    assert first["timed"] == second["timed"] == (1, "time"), "the ranks stop together when one runs out of time"
    assert first["losses"] == second["losses"], "logged losses are averaged over ranks"
    for name, value in first["weights"].items():
        assert torch.equal(value, second["weights"][name]), f"the ranks gave back different {name}"


def test_a_checkpoint_written_sharded_resumes_to_the_weights_of_an_uninterrupted_run(runs):
    folder = runs["folder"]
    for rank in runs["ranks"]:
        steps, losses = rank["first"]
        assert steps == 2 and losses == rank["losses"][:2]
        second = rank["second"]
        assert second.resumed_from == 2 and second.steps == STEPS and second.stopped == "steps"
        assert second.losses == pytest.approx(rank["losses"], rel=1e-6)
        for name, value in rank["weights"].items():
            torch.testing.assert_close(rank["resumed"][name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert sorted(p.name for p in folder.iterdir()) == [
        "distill.json", f"optimizer-{STEPS}.pt", f"student-{STEPS}.safetensors"], "old checkpoints are removed"
    assert json.loads((folder / "distill.json").read_text())["step"] == STEPS
    torch.load(folder / f"optimizer-{STEPS}.pt", weights_only=True)  # tensors and numbers only

    at_two = Path(str(folder) + "-at-2")  # one process resumes the sharded checkpoint of step 2
    fresh = _student()
    alone = sp.distill(fresh, _teacher(), _whole_batches(), checkpoint=at_two, **OPTIONS)
    assert alone.resumed_from == 2 and alone.losses == pytest.approx(runs["whole"].losses, rel=1e-4, abs=1e-5)
    for name, value in runs["alone"].items():
        torch.testing.assert_close(fresh.get_parameter(name), value, **TOLERANCE, msg=name)
    from safetensors import safe_open

    with safe_open(str(folder / f"student-{STEPS}.safetensors"), "pt") as sharded, \
            safe_open(str(at_two / f"student-{STEPS}.safetensors"), "pt") as single:
        assert sorted(sharded.keys()) == sorted(single.keys()), "tied weights are stored once, as save_model does"
        assert sharded.metadata() == single.metadata()


def test_the_parallel_option_is_checked_before_anything_changes():
    teacher, student = _teacher(), _student()
    kept = snapshot(student)
    with pytest.raises(sp.InvalidOptionError, match="parallel must be"):
        sp.distill(student, teacher, _rank_batches(0), steps=1, parallel="zero3")
    with pytest.raises(sp.InvalidOptionError, match="torchrun"):
        sp.distill(student, teacher, _rank_batches(0), steps=1, parallel="fsdp")  # no process group here
    assert_unchanged(student, kept)
