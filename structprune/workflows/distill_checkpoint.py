"""Resumable :func:`structprune.distill` runs: a checkpoint folder written atomically, in one format whatever
the run's parallelism.

The folder holds the student (``student-<step>.safetensors``, as ``safetensors.torch.save_model`` writes it:
tied weights stored once, the dropped names noted in its metadata), the optimizer and RNG state
(``optimizer-<step>.pt``: tensors, numbers and strings only, read back with ``weights_only=True``, so
loading runs no pickled code) and a JSON record (``distill.json``) naming them. The record is swapped in
last by one rename, so a run killed at any moment leaves the previous checkpoint whole.

Under FSDP the weights and optimizer state are sharded; the ``torch.distributed.checkpoint`` state-dict
helpers gather them whole on rank 0 (in host memory), and the optimizer state, which those helpers key by
parameter name, is rekeyed by position as ``Optimizer.state_dict()`` keys it. So a checkpoint written by
one process, by DDP or by FSDP resumes under any of them.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import InvalidOptionError
from .distill_parallel import Placement, barrier, is_writer

RECORD = "distill.json"
SETTINGS = ("lr", "weight_decay", "temperature", "alpha", "hidden")  # a resumed run must keep these


def read_record(folder: Path, settings: Dict[str, float]) -> Optional[Dict[str, Any]]:
    """The folder's record (``None`` when there is none yet); refused when it was written with other
    settings, since continuing would silently mix two runs."""
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


def load_student(folder: Path, record: Dict[str, Any], student: nn.Module) -> None:
    """Load the recorded weights into the caller's (unwrapped, unsharded) student; every rank reads them."""
    from safetensors.torch import load_model

    missing, unexpected = load_model(student, str(folder / record["student"]), strict=False)
    if missing or unexpected:
        raise InvalidOptionError(f"the checkpoint in {folder} holds another model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); pass the student it was written for")


def load_optimizer(folder: Path, record: Dict[str, Any], placement: Placement,
                   optimizer: torch.optim.Optimizer) -> None:
    """Load the recorded optimizer and RNG state (every rank reads the whole file; under FSDP each keeps
    its shard of the optimizer state)."""
    state = torch.load(folder / record["optimizer"], weights_only=True)
    if placement.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = [name for name, _ in placement.trainable()]
        set_optimizer_state_dict(placement.model, optimizer, _by_name(state["optimizer"], names, folder),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])


def save_checkpoint(folder: Path, step: int, losses: List[float], settings: Dict[str, float], student: nn.Module,
                    placement: Placement, optimizer: torch.optim.Optimizer) -> None:
    """Files named by step, then the JSON record that points at them swapped in by one rename: a run killed
    at any moment leaves the previous checkpoint whole. Every rank calls this (gathering shards is
    collective); rank 0 writes."""
    weights: Optional[Dict[str, Any]] = None
    gathered: Dict[str, Any] = {}
    if placement.sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0 only
        weights = get_model_state_dict(placement.model, options=options)
        gathered = get_optimizer_state_dict(placement.model, optimizer, options=options)
    if is_writer():
        from safetensors.torch import save_model

        folder.mkdir(parents=True, exist_ok=True)
        previous = json.loads((folder / RECORD).read_text()) if (folder / RECORD).exists() else None
        names = {"student": f"student-{step}.safetensors", "optimizer": f"optimizer-{step}.pt"}
        if weights is None:
            save_model(student, str(folder / names["student"]))
            optimizer_state = optimizer.state_dict()
        else:
            _save_weights(weights, student, folder / names["student"])
            optimizer_state = _by_index(gathered, [name for name, _ in placement.trainable()])
        torch.save({"optimizer": optimizer_state, "rng": torch.get_rng_state()}, folder / names["optimizer"])
        record = {"step": step, "losses": losses, "settings": settings, **names}
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".json", delete=False) as handle:
            json.dump(record, handle)
        os.replace(handle.name, folder / RECORD)
        if previous is not None:
            for key in ("student", "optimizer"):
                if previous[key] != names[key]:
                    (folder / previous[key]).unlink(missing_ok=True)
    barrier()


def _save_weights(weights: Dict[str, Any], student: nn.Module, path: Path) -> None:
    """Write a gathered state dict as ``save_model(student)`` writes the student: tied names (found on the
    caller's student, where they share storage) stored once, the dropped ones noted in the metadata."""
    from safetensors.torch import save_file

    dropped = _tied_names(student)
    save_file({k: v.contiguous() for k, v in weights.items() if k not in dropped}, str(path),
              metadata=dropped or None)


def _tied_names(module: nn.Module) -> Dict[str, str]:
    """Each state-dict name sharing storage with another, mapped to the name kept for its group (the first
    in sorted order, as safetensors chooses)."""
    groups: Dict[Any, List[str]] = {}
    for name, tensor in module.state_dict().items():
        if tensor.device.type != "meta" and tensor.numel() and tensor.untyped_storage().data_ptr():
            groups.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    return {name: min(group) for group in groups.values() for name in group if name != min(group)}


def _by_index(state: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """An optimizer state dict keyed by parameter name (the distributed-checkpoint helpers' form) rekeyed by
    position in ``names`` (``Optimizer.state_dict()``'s form)."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": sorted(index[name] for name in group["params"])}
                             for group in state["param_groups"]]}


def _by_name(state: Dict[str, Any], names: List[str], folder: Path) -> Dict[str, Any]:
    """The inverse of :func:`_by_index`, for ``set_optimizer_state_dict``."""
    count = sum(len(group["params"]) for group in state["param_groups"])
    if count != len(names):
        raise InvalidOptionError(f"the optimizer state in {folder} is for {count} parameters, the student trains "
                                 f"{len(names)}; pass the student (and requires_grad settings) it was written for")
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}
