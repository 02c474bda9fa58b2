"""sp.distill: the pruned student learns the dense teacher's outputs back, resumably, under DDP too."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import structprune as sp
from structprune.workflows.distill import kl_loss
from tests.helpers import assert_unchanged, free_port, snapshot, tiny_llama

transformers = pytest.importorskip("transformers")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def _inputs(n=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=generator) for _ in range(n)]


def _gap(student, teacher, xs):
    with torch.no_grad():
        return float(sum(kl_loss(student(x), teacher(x)) for x in xs))


def test_a_pruned_mlp_moves_towards_its_teacher_and_the_teacher_is_untouched():
    teacher = _mlp()
    student = sp.slim(teacher, torch.randn(2, 8), 0.6)
    kept = snapshot(teacher)
    held_out = _inputs(4, seed=9)
    before = _gap(student, teacher, held_out)
    student.eval()
    result = sp.distill(student, teacher, _inputs(), steps=120, lr=3e-3)
    assert result.steps == 120 and result.stopped == "steps" and len(result.losses) == 120
    assert result.final_loss < result.losses[0] / 2
    assert _gap(student, teacher, held_out) < before / 2
    assert not student.training, "the student's mode is restored"
    assert_unchanged(teacher, kept)


def test_kl_loss_is_zero_on_equal_logits_and_matches_the_definition_with_temperature():
    torch.manual_seed(0)
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    assert float(kl_loss(t, t)) == pytest.approx(0, abs=1e-6)
    p = torch.softmax(t / 2, -1)
    expected = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(kl_loss(s, t, temperature=2.0), expected)
    half = kl_loss(s.half(), t.half())
    assert half.dtype == torch.float32


def test_padding_does_not_count_and_a_padded_llama_learns():
    teacher = tiny_llama(initializer_range=0.2)  # peaked outputs: a default init predicts near-uniformly
    student = sp.slim(teacher, torch.randint(0, 100, (2, 12)), 0.4, hidden=False, criterion="random")
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    s, t = torch.randn(2, 12, 100), torch.randn(2, 12, 100)
    changed = s.clone()
    changed[1, 8:] = 5 * torch.randn(4, 100)  # only padded positions differ
    assert torch.equal(kl_loss(s, t, mask=mask), kl_loss(changed, t, mask=mask))
    assert not torch.equal(kl_loss(s, t), kl_loss(changed, t))
    batches = [{"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": mask} for _ in range(4)]
    batches.append({"input_ids": ids, "attention_mask": mask})
    result = sp.distill(student, teacher, batches, steps=40, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.final_loss < result.losses[0] / 3


def test_hidden_matching_runs_at_equal_widths_and_refuses_a_narrower_residual_stream():
    teacher = tiny_llama(layers=3, initializer_range=0.2)
    data = [torch.randint(0, 100, (2, 10)) for _ in range(3)]
    same_width = sp.remove_blocks(teacher, data[0], n=1, data=data)[0]
    result = sp.distill(same_width, teacher, data, steps=20, lr=1e-3, hidden=1.0)
    assert result.final_loss < result.losses[0]
    narrower = sp.slim(teacher, data[0], 0.3, hidden=True, criterion="random")
    assert narrower.config.hidden_size < teacher.config.hidden_size
    kept = snapshot(narrower)
    with pytest.raises(sp.InvalidOptionError, match="as wide as the teacher"):
        sp.distill(narrower, teacher, data, steps=5, hidden=1.0)
    assert_unchanged(narrower, kept)


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path):
    teacher = _mlp()
    data = _inputs(4)
    straight = sp.slim(teacher, torch.randn(2, 8), 0.5)
    interrupted = copy.deepcopy(straight)
    whole = sp.distill(straight, teacher, data, steps=7, lr=1e-3)
    first = sp.distill(interrupted, teacher, data, steps=3, lr=1e-3, checkpoint=tmp_path, checkpoint_every=2)
    assert first.steps == 3 and json.loads((tmp_path / "distill.json").read_text())["step"] == 3
    fresh = sp.slim(teacher, torch.randn(2, 8), 0.5)  # a new process: the student starts from the pruned weights
    second = sp.distill(fresh, teacher, data, steps=7, lr=1e-3, checkpoint=tmp_path, checkpoint_every=2)
    assert second.resumed_from == 3 and second.steps == 7
    assert second.losses == pytest.approx(whole.losses, rel=1e-5)
    for a, b in zip(straight.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["distill.json", "optimizer-7.pt", "student-7.safetensors"], "old checkpoints are removed"
    torch.load(tmp_path / "optimizer-7.pt", weights_only=True)  # tensors and numbers only: no pickled objects
    with pytest.raises(sp.InvalidOptionError, match="other settings"):
        sp.distill(fresh, teacher, data, steps=9, lr=5e-4, checkpoint=tmp_path)


@pytest.mark.parametrize("options, match", [
    ({"lr": 0}, "lr must be"), ({"temperature": -1}, "temperature must be"), ({"alpha": 1.5}, "alpha must be"),
    ({"steps": 0}, "steps must be"), ({"epochs": 0}, "epochs must be"), ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"max_seconds": float("nan")}, "max_seconds"), ({"hidden": -1}, "hidden must be"),
])
def test_bad_options_raise_before_the_student_changes(options, match):
    teacher = _mlp()
    student = sp.slim(teacher, torch.randn(2, 8), 0.5)
    kept = snapshot(student)
    with pytest.raises(sp.InvalidOptionError, match=match):
        sp.distill(student, teacher, _inputs(2), **options)
    assert_unchanged(student, kept)


def test_bad_data_and_models_are_refused():
    teacher = _mlp()
    student = sp.slim(teacher, torch.randn(2, 8), 0.5)
    with pytest.raises(sp.InvalidOptionError, match="iterable of batches"):
        sp.distill(student, teacher, torch.randn(4, 8))
    with pytest.raises(sp.InvalidOptionError, match="same model"):
        sp.distill(teacher, teacher, _inputs(2))
    with pytest.raises(sp.InvalidOptionError, match="no batches"):
        sp.distill(student, teacher, [])
    with pytest.raises(sp.InvalidOptionError, match="iterated again"):
        sp.distill(student, teacher, iter(_inputs(2)), epochs=2)
    kept = snapshot(student)
    with pytest.raises(sp.InvalidOptionError, match="task loss"):
        sp.distill(student, teacher, _inputs(2), alpha=0.5)  # plain inputs carry no targets
    assert_unchanged(student, kept)


def test_epochs_time_budget_and_a_task_loss_from_targets():
    teacher = _mlp()
    student = sp.slim(teacher, torch.randn(2, 8), 0.5)
    assert sp.distill(student, teacher, _inputs(3), epochs=2).steps == 6
    generator = (x for x in _inputs(3))
    once = sp.distill(student, teacher, generator, steps=10)
    assert once.steps == 3 and once.stopped == "data", "a one-shot iterator ends the run when it is spent"
    timed = sp.distill(student, teacher, _inputs(3), steps=100, max_seconds=1e-9)
    assert timed.steps == 1 and timed.stopped == "time"
    pairs = [(x, torch.randint(0, 5, (16,))) for x in _inputs(3)]
    mixed = sp.distill(student, teacher, pairs, steps=30, lr=3e-3, alpha=0.5, temperature=2.0)
    assert mixed.final_loss < mixed.losses[0]


def _worker(rank: int, world: int, port: int, folder: str, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        teacher = _mlp()
        student = sp.slim(teacher, torch.randn(2, 8), 0.5)
        result = sp.distill(student, teacher, _inputs(3, seed=10 + rank), steps=6, lr=1e-3, checkpoint=folder,
                            checkpoint_every=3)
        results[rank] = ([p.detach().clone() for p in student.parameters()], result.losses)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ddp_processes_train_one_student_and_rank_zero_writes_the_checkpoint(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), results), nprocs=2, join=True)
    (params0, losses0), (params1, losses1) = results[0], results[1]
    for a, b in zip(params0, params1):
        torch.testing.assert_close(a, b)
    assert losses0 == losses1, "logged losses are averaged over ranks"
    assert json.loads((tmp_path / "distill.json").read_text())["step"] == 6
    teacher = _mlp()  # one process on one rank's data alone ends elsewhere: the gradients were averaged
    alone = sp.slim(teacher, torch.randn(2, 8), 0.5)
    sp.distill(alone, teacher, _inputs(3, seed=10), steps=6, lr=1e-3)
    assert any(not torch.allclose(a, b) for a, b in zip(alone.parameters(), params0))
