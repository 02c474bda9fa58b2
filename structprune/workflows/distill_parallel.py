"""Where :func:`structprune.distill` runs when ``torch.distributed`` is initialised (``torchrun``).

Two ways, chosen by ``parallel=``:

* ``"ddp"`` (the default with more than one rank): the caller's student is wrapped in
  ``DistributedDataParallel``, so every rank holds whole copies of student and teacher and the student is
  trained in place. Fastest for models that fit one device.
* ``"fsdp"``: student and teacher are sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) over all
  ranks, each repeated block (a decoder layer) as its own unit and then the root, so each rank keeps about
  ``1 / world_size`` of the parameters, gradients and optimizer state. The caller's modules are never
  wrapped or converted: a copy of each is built on the meta device (no memory), sharded, materialised on
  the compute device and loaded from the caller's weights; at the end the trained weights are gathered,
  one parameter at a time, back into the caller's student on every rank, which therefore still holds
  ordinary tensors (``save_pretrained`` works) and keeps its class, parameter objects and tied weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InvalidOptionError
from ..planning.hardware import model_device_dtype

PARALLEL = ("ddp", "fsdp")


def distributed() -> bool:
    """Whether this process is one of several (``torch.distributed`` initialised, world size above one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_writer() -> bool:
    """Whether this process writes files and progress: rank 0, or the only process."""
    return not distributed() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if distributed():
        dist.barrier()


def mean_over_ranks(loss: torch.Tensor) -> float:
    """The loss averaged over ranks, so every rank logs the same number: the loss of the whole batch."""
    if distributed():
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return float(loss)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on some rank. Decisions to stop early (the time budget) must be taken by all
    ranks at one step, or those still training wait forever for the others' collectives."""
    if not distributed():
        return flag
    tensor = torch.tensor(float(flag), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor)


def check_parallel(parallel: Any) -> Optional[str]:
    """Refuse an unknown ``parallel`` or one that needs ``torch.distributed`` without it; return the way
    the run will go: ``"ddp"``, ``"fsdp"``, or ``None`` (one process, no wrapper)."""
    if parallel is not None and parallel not in PARALLEL:
        raise InvalidOptionError(f"parallel must be None (DDP under torchrun, else one process), 'ddp' or 'fsdp'; "
                                 f"got {parallel!r}")
    if parallel is None:
        return "ddp" if distributed() else None
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidOptionError(f"parallel={parallel!r} needs torch.distributed initialised: run the script under "
                                 f"torchrun (torchrun --nproc_per_node 2 script.py) and call "
                                 f"torch.distributed.init_process_group() first, or leave parallel=None")
    return parallel


def device_of(model: nn.Module) -> torch.device:
    """The device a model computes on (its first floating parameter's)."""
    return model_device_dtype(model)[0]


def batch_to(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, mapping, tuple or list of them) with its tensors moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch


@dataclass
class Placement:
    """The modules a distillation run works on.

    Attributes:
        model: the module whose parameters the optimizer updates: the caller's student, or its sharded copy.
        call: the module the loss calls for the student: ``model``, or its ``DistributedDataParallel`` wrapper.
        teacher: the caller's teacher, or its sharded copy.
        sharded: whether ``model`` and ``teacher`` are FSDP2 copies (their parameters DTensor shards).
    """

    model: nn.Module
    call: nn.Module
    teacher: nn.Module
    sharded: bool = False

    def trainable(self) -> List[Tuple[str, nn.Parameter]]:
        """The parameters to optimise, by name, in the order the optimizer (and its checkpoints) holds them."""
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def give_back(self, student: nn.Module) -> None:
        """Make the caller's ``student`` hold the trained weights (a no-op when it was trained in place).

        Under FSDP every rank gathers each trained parameter whole (one all-gather per tensor, so at most one
        full tensor more than the shards is held) and copies it into the caller's parameter of that name;
        buffers (BatchNorm statistics) are taken from rank 0, as DDP does, so every rank gives back the same
        model."""
        if not self.sharded:
            return
        from torch.distributed.tensor import DTensor

        params, buffers = dict(student.named_parameters()), dict(student.named_buffers())
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad:  # frozen parameters were not trained: the caller's are current
                    params[name].copy_(param.full_tensor() if isinstance(param, DTensor) else param)
            for name, buffer in self.model.named_buffers():
                if distributed():
                    dist.broadcast(buffer, 0)
                buffers[name].copy_(buffer)

    def close(self) -> None:
        """Drop the DDP wrapper (and its hooks on the student); sharded copies go with this object."""
        self.call = self.model


def place(student: nn.Module, teacher: nn.Module, parallel: Optional[str]) -> Placement:
    """Set up ``student`` and ``teacher`` for ``parallel`` (the value :func:`check_parallel` returned)."""
    if parallel == "fsdp":
        device = _compute_device(student)
        mesh = _mesh(device)
        sharded = _shard(student, mesh, device, frozen=False)
        return Placement(sharded, sharded, _shard(teacher, mesh, device, frozen=True), sharded=True)
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = device_of(student)
        wrapper = DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
        return Placement(student, wrapper, teacher)
    return Placement(student, student, teacher)


# ---- FSDP2 --------------------------------------------------------------------------------------------

def repeated_blocks(model: nn.Module) -> List[nn.Module]:
    """The children of the largest (by parameter count) ``nn.ModuleList`` whose children are all of one
    class: a transformer's decoder layers. Each becomes one FSDP unit, so only one block's parameters are
    gathered whole at a time. Empty when the model has none (then the root is the only unit)."""
    best: List[nn.Module] = []
    best_size = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(child) for child in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def _compute_device(student: nn.Module) -> torch.device:
    """Where the shards live: the student's device, except that a student on the CPU goes to this rank's
    GPU under the NCCL backend (the way to recover a model that fits in host memory but not on one GPU)."""
    device = device_of(student)
    if device.type == "cpu" and torch.cuda.is_available() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _mesh(device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (no memory), tied
    parameters still tied: ``deepcopy`` takes each tensor from the memo instead of copying its data."""
    memo: Dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in memo:
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, nn.Parameter) else empty)
    return copy.deepcopy(model, memo)


def _shard(model: nn.Module, mesh: Any, device: torch.device, *, frozen: bool) -> nn.Module:
    """An FSDP2-sharded copy of ``model`` on ``device`` holding ``model``'s weights: each repeated block,
    then the root, is ``fully_shard``-ed on a meta copy, which is then materialised and loaded from the
    full state dict (each rank keeps its slice). ``frozen`` (the teacher): no gradients, and the root too
    is resharded after every forward (by default FSDP keeps the root gathered for the backward pass)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    shadow = _meta_copy(model)
    if frozen:
        shadow.requires_grad_(False)
    for block in repeated_blocks(shadow):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(shadow, mesh=mesh, reshard_after_forward=True if frozen else None)
    shadow.to_empty(device=device)
    set_model_state_dict(shadow, model.state_dict(), options=StateDictOptions(full_state_dict=True))
    buffers = dict(model.named_buffers())  # FSDP does not shard buffers; non-persistent ones are not in state dicts
    with torch.no_grad():
        for name, buffer in shadow.named_buffers():
            buffer.copy_(buffers[name])
    shadow.train(model.training)
    return shadow
