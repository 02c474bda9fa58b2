"""The losses :func:`structprune.distill` minimises, and how they are read out of a model's outputs.

Kept apart from the training loop so they can be tested (and reused) on plain tensors: the KL term
between the teacher's and the student's softened distributions, the hidden-state matching term, and the
task loss taken from the batch's labels or targets. Each is computed in float32 whatever the models'
dtype, so a bfloat16 student does not lose the small differences it is trained on.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOptionError
from ..scoring.activations import run_batch
from ..tools.outputs import logits_of

Batch = Any
TaskLoss = Callable[[Any, Batch], torch.Tensor]


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per position (the last dim holds the
    classes or vocabulary), averaged over the positions ``mask`` keeps; float32 whatever the logits' dtype."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return masked_mean(per_position, mask) * temperature ** 2


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
        terms.append(masked_mean(error, mask) / masked_mean(scale, mask).clamp_min(1e-12))
    return torch.stack(terms).mean()


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean of ``values`` over the positions ``mask`` keeps (all of them when the mask does not fit)."""
    if mask is None or mask.shape != values.shape:
        return values.mean()
    keep = mask.to(values.device, torch.bool)
    return values[keep].mean() if keep.any() else values.sum() * 0


def logits(output: Any) -> torch.Tensor:
    """The logits in a model's output, or a clear error naming the ``forward=`` way out."""
    found = logits_of(output)
    if found is None:
        raise InvalidOptionError(f"the model returned {type(output).__name__}, with no logits to distill; "
                                 f"pass forward=lambda model, batch: <logits tensor>")
    return found


def hidden_states(output: Any) -> Tuple[torch.Tensor, ...]:
    """The per-layer hidden states in a model's output (Hugging Face's ``hidden_states``)."""
    states = getattr(output, "hidden_states", None)
    if states is None and isinstance(output, Mapping):
        states = output.get("hidden_states")
    if not states:
        raise InvalidOptionError("hidden matching needs outputs with hidden_states (Hugging Face models return "
                                 "them with output_hidden_states=True); pass forward= that returns them, or hidden=0")
    return tuple(states)


def with_hidden_states(model: nn.Module, batch: Batch) -> Any:
    """:func:`run_batch`, asking a Hugging Face model for its hidden states too."""
    return run_batch(model, batch, output_hidden_states=True)


def attention_mask(batch: Batch) -> Optional[torch.Tensor]:
    """The batch's ``attention_mask`` (in a mapping, or in the inputs of an ``(inputs, targets)`` pair)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        batch = batch[0]
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def task_loss(output: Any, batch: Batch, loss_fn: Optional[TaskLoss]) -> torch.Tensor:
    """The task loss mixed in when ``alpha < 1``: ``loss_fn``'s, the model's own ``loss`` (batches with
    ``labels``), or cross-entropy against the targets of an ``(inputs, targets)`` pair."""
    if loss_fn is not None:
        return loss_fn(output, batch)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        found = logits(output)
        return F.cross_entropy(found.float().reshape(-1, found.shape[-1]), batch[1].to(found.device).reshape(-1))
    raise InvalidOptionError("alpha < 1 mixes in a task loss, and this batch has none: pass batches with "
                             "labels, (inputs, targets) pairs, or loss_fn=lambda output, batch: ...")
