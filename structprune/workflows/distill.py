"""Recovery after pruning: knowledge distillation from the dense teacher into the pruned student.

Pruning removes capacity the dense model used; a short run of distillation (Hinton et al. 2015), training
the student to match the teacher's output distribution on unlabelled text or images, wins most of it back
far faster than training on labels alone, because every token carries the teacher's full distribution over
the vocabulary. :func:`distill` is that step, built for pruned language models and CNNs alike:

* the loss is ``alpha * T^2 * KL(teacher_T || student_T)`` per position (computed in float32 whatever the
  models' dtype; padding excluded through the batch's ``attention_mask``) plus ``(1 - alpha)`` times the task
  loss (the model's own ``loss`` for batches with ``labels``, cross-entropy for ``(inputs, targets)`` pairs,
  or ``loss_fn``) plus ``hidden`` times a hidden-state matching term (normalised MSE between student layers
  and the teacher layers at the same relative depth, so a depth-pruned student matches too);
* AdamW over the student's trainable parameters, gradient-norm clipping, a wall-clock budget;
* resumable: ``checkpoint=`` a folder where the student (safetensors), the optimizer and RNG state (a
  tensors-only file read back with ``weights_only=True``) and a JSON record are written atomically every
  ``checkpoint_every`` steps; calling again with the same folder continues where it stopped;
* under ``torchrun`` (``torch.distributed`` initialised, world size above one) the student is wrapped in
  ``DistributedDataParallel``: each rank passes its own shard of the data, gradients are averaged, rank 0
  writes the checkpoints.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOptionError
from ..options import check_positive_int, require_module
from ..planning.hardware import model_device_dtype
from ..scoring.activations import run_batch
from ..tools.outputs import logits_of
from ..tools.progress import progress_bar

Batch = Any
Forward = Callable[[nn.Module, Batch], Any]
TaskLoss = Callable[[Any, Batch], torch.Tensor]

RECORD = "distill.json"
SETTINGS = ("lr", "weight_decay", "temperature", "alpha", "hidden")  # a resumed run must keep these


@dataclass
class DistillResult:
    """What a :func:`distill` run did.

    Attributes:
        steps: optimizer steps taken in total (a resumed run counts the earlier ones too).
        seconds: wall-clock seconds this call took (a resumed run counts only its own).
        losses: the loss of every step, in order.
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
            grad_clip: Optional[float] = 1.0) -> DistillResult:
    """Train ``student`` (the pruned model, in place) to imitate ``teacher`` (the dense one) on ``data``.

    ``data`` yields batches as calibration data does: a tensor of inputs (token ids), a mapping of keyword
    inputs (``input_ids``, ``attention_mask``, optionally ``labels``), an ``(inputs, targets)`` pair, or a
    tuple of positional inputs; ``forward(model, batch)`` replaces that calling convention. The run takes
    ``steps`` optimizer steps (cycling over ``data`` as often as needed), or else ``epochs`` passes over
    ``data``, stopping early when ``max_seconds`` have elapsed. The teacher is only evaluated (``eval()``,
    no gradients); the student's training mode is restored when the run ends.

    Options are checked before anything changes: an invalid one raises :class:`InvalidOptionError` with the
    student untouched.
    """
    _check(student, teacher, data, steps, epochs, lr, weight_decay, temperature, alpha, hidden, loss_fn,
           max_seconds, checkpoint_every, grad_clip)
    settings = {"lr": lr, "weight_decay": weight_decay, "temperature": temperature, "alpha": alpha,
                "hidden": hidden}
    record = _read_record(Path(checkpoint), settings) if checkpoint is not None else None
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    if hidden:
        data = _check_hidden_widths(student, teacher, data, forward)
    resumed_from = 0
    losses: List[float] = []
    if record is not None:
        _load_checkpoint(Path(checkpoint), record, student, optimizer)  # type: ignore[arg-type]
        resumed_from, losses = record["step"], list(record["losses"])

    run = _Run(student, teacher, forward, temperature, alpha, hidden, loss_fn)
    total = steps if steps is not None else _epoch_steps(data, epochs)
    bar = progress_bar(total, "distill") if progress and _is_writer() else None
    if bar is not None:
        bar.update(resumed_from)
    student_mode, teacher_mode = student.training, teacher.training
    student.train()
    teacher.eval()
    start = time.perf_counter()
    step, stopped = resumed_from, "data"
    try:
        finished = steps is not None and step >= steps
        for batch in () if finished else _batches(data, steps, epochs, skip=resumed_from):
            loss = run.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            optimizer.step()
            step += 1
            losses.append(_mean_over_ranks(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if checkpoint is not None and step % checkpoint_every == 0:
                _save_checkpoint(Path(checkpoint), step, losses, settings, student, optimizer)
            if steps is not None and step >= steps:
                break
            if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                stopped = "time"
                break
        if steps is not None and step >= steps:
            stopped = "steps"
        if checkpoint is not None and step > resumed_from and step % checkpoint_every:
            _save_checkpoint(Path(checkpoint), step, losses, settings, student, optimizer)
    finally:
        run.close()
        student.train(student_mode)
        teacher.train(teacher_mode)
        if bar is not None:
            bar.close()
    return DistillResult(step, time.perf_counter() - start, losses, resumed_from, stopped)


class _Run:
    """The per-batch loss: the student (wrapped in DistributedDataParallel under torchrun) against the
    teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, forward: Optional[Forward], temperature: float,
                 alpha: float, hidden: float, loss_fn: Optional[TaskLoss]):
        self.student, self.teacher = student, teacher
        self.trained = _ddp(student)
        self.forward = forward or (_with_hidden_states if hidden else run_batch)
        self.temperature, self.alpha, self.hidden, self.loss_fn = temperature, alpha, hidden, loss_fn

    def loss(self, batch: Batch) -> torch.Tensor:
        output = self.forward(self.trained, _to(batch, _device(self.student)))
        loss = torch.zeros((), device=_device(self.student))
        if self.alpha > 0 or self.hidden > 0:
            with torch.no_grad():
                target = self.forward(self.teacher, _to(batch, _device(self.teacher)))
            mask = _attention_mask(batch)
            if self.alpha > 0:
                loss = loss + self.alpha * kl_loss(_logits(output), _logits(target).to(_logits(output).device),
                                                   self.temperature, mask)
            if self.hidden > 0:
                loss = loss + self.hidden * hidden_loss(_hidden_states(output), _hidden_states(target), mask)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * _task_loss(output, batch, self.loss_fn)
        return loss

    def close(self) -> None:
        self.trained = self.student  # drop the DDP wrapper (and its hooks on the student)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per position (the last dim holds the
    classes or vocabulary), averaged over the positions ``mask`` keeps; float32 whatever the logits' dtype."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return _masked_mean(per_position, mask) * temperature ** 2


def hidden_loss(student_states: Tuple[torch.Tensor, ...], teacher_states: Tuple[torch.Tensor, ...],
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over the student's layers of the MSE to the teacher layer at the same relative depth, each
    divided by that teacher layer's mean square (so layers of every scale weigh alike)."""
    last_student, last_teacher = len(student_states) - 1, len(teacher_states) - 1
    terms = []
    for i, state in enumerate(student_states):
        target = teacher_states[round(i * last_teacher / max(last_student, 1))].float().to(state.device)
        error = (state.float() - target).square().mean(-1)
        scale = target.square().mean(-1)
        terms.append(_masked_mean(error, mask) / _masked_mean(scale, mask).clamp_min(1e-12))
    return torch.stack(terms).mean()


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None or mask.shape != values.shape:
        return values.mean()
    keep = mask.to(values.device, torch.bool)
    return values[keep].mean() if keep.any() else values.sum() * 0


def _logits(output: Any) -> torch.Tensor:
    logits = logits_of(output)
    if logits is None:
        raise InvalidOptionError(f"the model returned {type(output).__name__}, with no logits to distill; "
                                 f"pass forward=lambda model, batch: <logits tensor>")
    return logits


def _hidden_states(output: Any) -> Tuple[torch.Tensor, ...]:
    states = getattr(output, "hidden_states", None)
    if states is None and isinstance(output, Mapping):
        states = output.get("hidden_states")
    if not states:
        raise InvalidOptionError("hidden matching needs outputs with hidden_states (Hugging Face models return "
                                 "them with output_hidden_states=True); pass forward= that returns them, or hidden=0")
    return tuple(states)


def _with_hidden_states(model: nn.Module, batch: Batch) -> Any:
    """:func:`run_batch`, asking a Hugging Face model for its hidden states too."""
    return run_batch(model, batch, output_hidden_states=True)


def _attention_mask(batch: Batch) -> Optional[torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        batch = batch[0]
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def _task_loss(output: Any, batch: Batch, loss_fn: Optional[TaskLoss]) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(output, batch)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        logits = _logits(output)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[1].to(logits.device).reshape(-1))
    raise InvalidOptionError("alpha < 1 mixes in a task loss, and this batch has none: pass batches with "
                             "labels, (inputs, targets) pairs, or loss_fn=lambda output, batch: ...")


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _device(model: nn.Module) -> torch.device:
    return model_device_dtype(model)[0]


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
           grad_clip: Optional[float]) -> None:
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
    call = forward or _with_hidden_states
    widths = []
    for model in (student, teacher):
        mode = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = call(model, _to(batch, _device(model)))
        except TypeError as error:
            raise InvalidOptionError(f"hidden matching could not get hidden states from "
                                     f"{type(model).__name__} ({error}); pass forward= that returns them, "
                                     f"or hidden=0") from error
        finally:
            model.train(mode)
        widths.append(_hidden_states(output)[-1].shape[-1])
    if widths[0] != widths[1]:
        raise InvalidOptionError(f"hidden matching needs the student's hidden states as wide as the teacher's "
                                 f"({widths[0]} vs {widths[1]}): prune with hidden=False (keep the residual "
                                 f"stream), or distil logits only with hidden=0")
    return data


# ---- checkpoints: safetensors + a tensors-only optimizer file + JSON, written atomically --------------

def _read_record(folder: Path, settings: Dict[str, float]) -> Optional[Dict[str, Any]]:
    path = folder / RECORD
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    changed = {k: (record["settings"].get(k), v) for k, v in settings.items() if record["settings"].get(k) != v}
    if changed:
        described = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise InvalidOptionError(f"the checkpoint in {folder} was written with other settings ({described}); "
                                 f"resume with the same ones, or pass a new checkpoint folder")
    return record


def _load_checkpoint(folder: Path, record: Dict[str, Any], student: nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
    from safetensors.torch import load_model

    missing, unexpected = load_model(student, str(folder / record["student"]), strict=False)
    if missing or unexpected:
        raise InvalidOptionError(f"the checkpoint in {folder} holds another model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); pass the student it was written for")
    state = torch.load(folder / record["optimizer"], weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])


def _save_checkpoint(folder: Path, step: int, losses: List[float], settings: Dict[str, float],
                     student: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Files named by step, then the JSON record that points at them swapped in by one rename: a run killed
    at any moment leaves the previous checkpoint whole."""
    if _is_writer():
        from safetensors.torch import save_model

        folder.mkdir(parents=True, exist_ok=True)
        previous = json.loads((folder / RECORD).read_text()) if (folder / RECORD).exists() else None
        names = {"student": f"student-{step}.safetensors", "optimizer": f"optimizer-{step}.pt"}
        save_model(student, str(folder / names["student"]))
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, folder / names["optimizer"])
        record = {"step": step, "losses": losses, "settings": settings, **names}
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".json", delete=False) as handle:
            json.dump(record, handle)
        os.replace(handle.name, folder / RECORD)
        if previous is not None:
            for key in ("student", "optimizer"):
                if previous[key] != names[key]:
                    (folder / previous[key]).unlink(missing_ok=True)
    if _distributed():
        dist.barrier()


# ---- torch.distributed -------------------------------------------------------------------------------

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_writer() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _ddp(student: nn.Module) -> nn.Module:
    if not _distributed():
        return student
    from torch.nn.parallel import DistributedDataParallel

    device = _device(student)
    return DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)


def _mean_over_ranks(loss: torch.Tensor) -> float:
    if _distributed():
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return float(loss)
