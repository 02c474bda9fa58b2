"""Recovery after pruning: knowledge distillation from the dense teacher into the pruned student.

Pruning removes capacity the dense model used; a short run of distillation (Hinton et al. 2015), training
the student to match the teacher's output distribution on unlabelled text or images, wins most of it back
far faster than training on labels alone, because every token carries the teacher's full distribution over
the vocabulary. :func:`distill` is that step, built for pruned language models and CNNs alike:

* the loss is ``alpha * T^2 * KL(teacher_T || student_T)`` per position (computed in float32 whatever the
  models' dtype; padding excluded through the batch's ``attention_mask``) plus ``(1 - alpha)`` times the task
  loss (the model's own ``loss`` for batches with ``labels``, cross-entropy for ``(inputs, targets)`` pairs,
  or ``loss_fn``) plus ``hidden`` times a hidden-state matching term (normalised MSE between student layers
  and the teacher layers at the same relative depth, so a depth-pruned student matches too); the losses
  are in :mod:`.distill_losses`;
* AdamW over the student's trainable parameters, gradient-norm clipping, a wall-clock budget;
* resumable: ``checkpoint=`` a folder where the student (safetensors), the optimizer and RNG state (a
  tensors-only file read back with ``weights_only=True``) and a JSON record are written atomically every
  ``checkpoint_every`` steps; calling again with the same folder continues where it stopped
  (:mod:`.distill_checkpoint`);
* under ``torchrun`` (``torch.distributed`` initialised) each rank passes its own shard of the data and
  rank 0 writes the checkpoints; the student is wrapped in ``DistributedDataParallel`` (``parallel="ddp"``,
  the default with more than one rank), or student and teacher are sharded with FSDP2
  (``parallel="fsdp"``) for models that do not fit one device (:mod:`.distill_parallel`).

This module holds the public function, the training loop, the walk over the data and the option checks.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import InvalidOptionError
from ..options import check_positive_int, require_module
from ..scoring.activations import run_batch
from ..tools.progress import progress_bar
from .distill_checkpoint import RECORD, SETTINGS, load_optimizer, load_student, read_record, save_checkpoint
from .distill_losses import (
    TaskLoss,
    attention_mask,
    hidden_loss,
    hidden_states,
    kl_loss,
    logits,
    task_loss,
    with_hidden_states,
)
from .distill_parallel import (
    Placement,
    any_rank,
    batch_to,
    check_parallel,
    device_of,
    is_writer,
    mean_over_ranks,
    place,
)

Batch = Any
Forward = Callable[[nn.Module, Batch], Any]

__all__ = ["RECORD", "SETTINGS", "DistillResult", "distill", "hidden_loss", "kl_loss"]


@dataclass
class DistillResult:
    """What a :func:`distill` run did.

    Attributes:
        steps: optimizer steps taken in total (a resumed run counts the earlier ones too).
        seconds: wall-clock seconds this call took (a resumed run counts only its own).
        losses: the loss of every step, in order (under torchrun, the mean over ranks).
        resumed_from: the step a checkpoint was resumed at (0 for a fresh run).
        stopped: why the run ended: ``"steps"``, ``"data"`` when ``epochs`` passes over the data were
            done, ``"time"`` when ``max_seconds`` ran out.
    """

    steps: int
    seconds: float
    losses: List[float] = field(default_factory=list)
    resumed_from: int = 0
    stopped: str = "data"

    @property
    def final_loss(self) -> float:
        """Mean loss of the last ten steps (NaN when no step was taken)."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else math.nan


def distill(student: nn.Module, teacher: nn.Module, data: Iterable[Batch], *, steps: Optional[int] = None,
            epochs: int = 1, lr: float = 1e-4, weight_decay: float = 0.0, temperature: float = 1.0,
            alpha: float = 1.0, hidden: float = 0.0, loss_fn: Optional[TaskLoss] = None,
            max_seconds: Optional[float] = None, checkpoint: Union[str, os.PathLike, None] = None,
            checkpoint_every: int = 100, progress: bool = False, forward: Optional[Forward] = None,
            grad_clip: Optional[float] = 1.0, parallel: Optional[str] = None) -> DistillResult:
    """Train ``student`` (the pruned model, in place) to imitate ``teacher`` (the dense one) on ``data``.

    ``data`` yields batches as calibration data does: a tensor of inputs (token ids), a mapping of keyword
    inputs (``input_ids``, ``attention_mask``, optionally ``labels``), an ``(inputs, targets)`` pair, or a
    tuple of positional inputs; ``forward(model, batch)`` replaces that calling convention. The run takes
    ``steps`` optimizer steps (cycling over ``data`` as often as needed), or else ``epochs`` passes over
    ``data``, stopping early when ``max_seconds`` have elapsed. The teacher is only evaluated (``eval()``,
    no gradients); the student's training mode is restored when the run ends.

    Under ``torchrun`` each rank passes its own shard of the data; gradients and the logged losses are
    averaged over ranks. ``parallel`` says how: ``None`` (the default) wraps the student in
    ``DistributedDataParallel`` when there is more than one rank; ``"ddp"`` asks for that explicitly;
    ``"fsdp"`` shards student and teacher over the ranks with FSDP2 (``fully_shard`` on each decoder layer,
    or other repeated block, then on the root), so each rank holds about ``1 / world_size`` of their
    weights and of the optimizer state. The caller's modules are not converted: sharded copies are trained
    and, when the run ends, the trained weights are gathered back into ``student`` on every rank, as
    ordinary tensors (if the run raises, ``student`` holds the weights training started from, those of the
    checkpoint when resuming, and the last checkpoint holds the progress). A student on the CPU under the
    NCCL backend is sharded onto each rank's current GPU.

    Options are checked before anything changes: an invalid one raises :class:`InvalidOptionError` with the
    student untouched.
    """
    parallel = _check(student, teacher, data, steps, epochs, lr, weight_decay, temperature, alpha, hidden,
                      loss_fn, max_seconds, checkpoint_every, grad_clip, parallel)
    settings = {"lr": lr, "weight_decay": weight_decay, "temperature": temperature, "alpha": alpha,
                "hidden": hidden}
    folder = Path(checkpoint) if checkpoint is not None else None
    record = read_record(folder, settings) if folder is not None else None
    if hidden:
        data = _check_hidden_widths(student, teacher, data, forward)
    if folder is not None and record is not None:
        load_student(folder, record, student)
    placement = place(student, teacher, parallel)
    trainable = [p for _, p in placement.trainable()]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    resumed_from = 0
    losses: List[float] = []
    if folder is not None and record is not None:
        load_optimizer(folder, record, placement, optimizer)
        resumed_from, losses = record["step"], list(record["losses"])

    run = _Run(placement, forward, temperature, alpha, hidden, loss_fn)
    total = steps if steps is not None else _epoch_steps(data, epochs)
    bar = progress_bar(total, "distill") if progress and is_writer() else None
    if bar is not None:
        bar.update(resumed_from)
    student_mode, teacher_mode = student.training, teacher.training
    placement.model.train()
    placement.teacher.eval()
    start = time.perf_counter()
    step, stopped = resumed_from, "data"
    try:
        finished = steps is not None and step >= steps
        for batch in () if finished else _batches(data, steps, epochs, skip=resumed_from):
            loss = run.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, grad_clip)  # DTensor gradients too: the global norm
            optimizer.step()
            step += 1
            losses.append(mean_over_ranks(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if folder is not None and step % checkpoint_every == 0:
                save_checkpoint(folder, step, losses, settings, student, placement, optimizer)
            if steps is not None and step >= steps:
                break
            if max_seconds is not None and any_rank(time.perf_counter() - start >= max_seconds, run.student_device):
                stopped = "time"
                break
        if steps is not None and step >= steps:
            stopped = "steps"
        if folder is not None and step > resumed_from and step % checkpoint_every:
            save_checkpoint(folder, step, losses, settings, student, placement, optimizer)
        placement.give_back(student)
    finally:
        placement.close()
        student.train(student_mode)
        teacher.train(teacher_mode)
        if bar is not None:
            bar.close()
    return DistillResult(step, time.perf_counter() - start, losses, resumed_from, stopped)


class _Run:
    """The per-batch loss: the student as placed (itself, its DDP wrapper or its FSDP2 shards) against the
    teacher (itself or its shards)."""

    def __init__(self, placement: Placement, forward: Optional[Forward], temperature: float, alpha: float,
                 hidden: float, loss_fn: Optional[TaskLoss]):
        self.placement = placement
        self.student_device, self.teacher_device = device_of(placement.model), device_of(placement.teacher)
        self.forward = forward or (with_hidden_states if hidden else run_batch)
        self.temperature, self.alpha, self.hidden, self.loss_fn = temperature, alpha, hidden, loss_fn

    def loss(self, batch: Batch) -> torch.Tensor:
        output = self.forward(self.placement.call, batch_to(batch, self.student_device))
        loss = torch.zeros((), device=self.student_device)
        if self.alpha > 0 or self.hidden > 0:
            with torch.no_grad():
                target = self.forward(self.placement.teacher, batch_to(batch, self.teacher_device))
            mask = attention_mask(batch)
            if self.alpha > 0:
                loss = loss + self.alpha * kl_loss(logits(output), logits(target).to(logits(output).device),
                                                   self.temperature, mask)
            if self.hidden > 0:
                loss = loss + self.hidden * hidden_loss(hidden_states(output), hidden_states(target), mask)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * task_loss(output, batch, self.loss_fn)
        return loss


# ---- the data: epochs, steps, resuming ----------------------------------------------------------------

def _batches(data: Iterable[Batch], steps: Optional[int], epochs: int, skip: int) -> Iterator[Batch]:
    """The batches of ``epochs`` passes (endless passes when ``steps`` bounds the run), the first ``skip``
    left out (a resumed run has consumed them)."""
    passes = 0
    seen = 0
    while steps is not None or passes < epochs:
        empty = True
        for batch in data:
            empty = False
            seen += 1
            if seen > skip:
                yield batch
        passes += 1
        if empty:
            if passes == 1:
                raise InvalidOptionError("the distillation data yielded no batches; pass a non-empty data=...")
            return  # a one-shot iterator is spent: the run ends with the data


def _epoch_steps(data: Iterable[Batch], epochs: int) -> Optional[int]:
    try:
        return len(data) * epochs  # type: ignore[arg-type]
    except TypeError:
        return None


# ---- checks, made before anything changes -------------------------------------------------------------

def _check(student: nn.Module, teacher: nn.Module, data: Iterable[Batch], steps: Optional[int], epochs: int,
           lr: float, weight_decay: float, temperature: float, alpha: float, hidden: float,
           loss_fn: Optional[TaskLoss], max_seconds: Optional[float], checkpoint_every: int,
           grad_clip: Optional[float], parallel: Any) -> Optional[str]:
    """Refuse invalid options; return how the run is parallelised (:func:`check_parallel`)."""
    require_module(student)
    require_module(teacher)
    if student is teacher:
        raise InvalidOptionError("student and teacher are the same model; distil the pruned copy from the "
                                 "original (slim returns a new model and leaves its input unchanged)")
    if not any(p.requires_grad for p in student.parameters()):
        raise InvalidOptionError("the student has no trainable parameters (every requires_grad is False)")
    if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise InvalidOptionError(f"data must be an iterable of batches (a list or a DataLoader), "
                                 f"got {type(data).__name__}; wrap one batch as [batch]")
    check_positive_int("steps", steps)
    check_positive_int("epochs", epochs, optional=False)
    check_positive_int("checkpoint_every", checkpoint_every, optional=False)
    for name, value, low_open in (("lr", lr, True), ("temperature", temperature, True),
                                  ("weight_decay", weight_decay, False), ("hidden", hidden, False)):
        _number(name, value, low_open)
    for name, bound in (("max_seconds", max_seconds), ("grad_clip", grad_clip)):
        if bound is not None:
            _number(name, bound, True)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise InvalidOptionError(f"alpha must be a number in [0, 1] (the weight of the teacher's logits "
                                 f"against the task loss), got {alpha!r}")
    if steps is None and isinstance(data, Iterator) and epochs > 1:  # a generator: iter() would not restart it
        raise InvalidOptionError("epochs > 1 needs data that can be iterated again (a list or a DataLoader), "
                                 "not a one-shot iterator; pass steps=... instead")
    return check_parallel(parallel)


def _number(name: str, value: Any, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (low_open and value == 0):
        bound = "> 0" if low_open else ">= 0"
        raise InvalidOptionError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_hidden_widths(student: nn.Module, teacher: nn.Module, data: Iterable[Batch],
                         forward: Optional[Forward]) -> Iterable[Batch]:
    """Hidden matching compares states element by element: both models must return them at one width. One
    batch is run through both in eval mode without gradients (nothing changes, BatchNorm statistics
    included). Returns the data, its first batch put back when it is a one-shot iterator."""
    iterator = iter(data)
    batch = next(iterator, None)
    if batch is None:
        raise InvalidOptionError("the distillation data yielded no batches; pass a non-empty data=...")
    if iterator is data:
        data = itertools.chain([batch], iterator)
    call = forward or with_hidden_states
    widths = []
    for model in (student, teacher):
        mode = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = call(model, batch_to(batch, device_of(model)))
        except TypeError as error:
            raise InvalidOptionError(f"hidden matching could not get hidden states from "
                                     f"{type(model).__name__} ({error}); pass forward= that returns them, "
                                     f"or hidden=0") from error
        finally:
            model.train(mode)
        widths.append(hidden_states(output)[-1].shape[-1])
    if widths[0] != widths[1]:
        raise InvalidOptionError(f"hidden matching needs the student's hidden states as wide as the teacher's "
                                 f"({widths[0]} vs {widths[1]}): prune with hidden=False (keep the residual "
                                 f"stream), or distil logits only with hidden=0")
    return data


