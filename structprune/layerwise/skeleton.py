"""A model whose parameters live on the ``meta`` device, filled from a checkpoint a few tensors at a time.

:func:`build_skeleton` builds the model class a Hugging Face config names with every parameter on
``meta`` and every buffer real: non-persistent buffers (rotary frequencies) are computed by the
constructor from the config and are not in the checkpoint, so they must exist for real. Building
costs no memory for the weights and no time for their random initialisation.

:class:`Materializer` swaps real tensors from the checkpoint into the skeleton's slots by name and
puts the original ``meta`` tensors back afterwards, so identities (and everything keyed by them:
tied weights, the dependency graph's canonical names) survive any number of rounds.
"""
from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Tuple

import torch
from torch import nn

from ..errors import LoadError
from ..graph.dependency_graph import canonical_names, named_tensors
from .checkpoint import Checkpoint
from .key_names import KeyNames


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to ``meta`` as it is registered (buffers are
    not): the constructor's initialisation then runs on ``meta`` and costs nothing."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Any) -> None:
        register(module, name, param)
        found = module._parameters.get(name)
        # a parameter already on meta is being tied or re-registered: keep its identity
        if found is not None and not found.is_meta:
            module._parameters[name] = type(found)(found.to("meta"), requires_grad=found.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def load_config(folder: "str | Path") -> Any:
    """The folder's Hugging Face config, or :class:`LoadError` saying why it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as error:  # transformers raises ValueError, OSError, KeyError... for a config it refuses
        raise LoadError(f"the config in {folder} cannot be read by transformers: "
                        f"{str(error).strip().splitlines()[0][:300]}") from error


def checkpoint_dtype(config: Any, checkpoint: Checkpoint) -> torch.dtype:
    """The dtype the weights are stored in (the most bytes), falling back to the config's."""
    stored = checkpoint.dtypes()
    if stored:
        return max(stored, key=lambda d: stored[d])
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def build_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM ``config`` describes, parameters on ``meta``, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as error:
        raise LoadError(f"transformers cannot build a causal language model from this config "
                        f"({type(config).__name__}): {str(error).strip().splitlines()[0][:300]}") from error
    return model.eval()


def return_freed_memory() -> None:
    """Hand memory freed by released tensors back to the operating system. glibc keeps freed blocks of up to
    32 MB in its heap for reuse (its mmap threshold grows after large frees), so a process that loads and
    frees one layer after another would otherwise keep the high-water mark of every layer size it has seen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        pass


class Materializer:
    """Real values for named tensors of ``model`` (canonical names, as the dependency graph uses), read
    from ``checkpoint`` onto ``device`` and swapped into every slot that holds the same tensor (tied weights
    stay tied)."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, device: "str | torch.device" = "cpu"):
        self.model, self.checkpoint, self.device = model, checkpoint, torch.device(device)
        tensors = named_tensors(model)
        canonical = canonical_names(tensors)
        self.canonical: Dict[str, str] = {name: canonical[id(t)] for name, t in tensors.items()}
        self.aliases: Dict[str, List[str]] = {}
        for name, t in tensors.items():
            self.aliases.setdefault(canonical[id(t)], []).append(name)
        self.slots: Dict[int, List[Tuple[Dict[str, Any], str]]] = {}
        for module in model.modules():
            for slots in (module._parameters, module._buffers):
                for attr, held in slots.items():
                    if held is not None:
                        self.slots.setdefault(id(held), []).append((slots, attr))
        self.originals: Dict[str, torch.Tensor] = {canonical[id(t)]: t for t in tensors.values()}
        self.keys = KeyNames(model, checkpoint)
        self.stored: Dict[str, str] = {}  # canonical name -> its key in the checkpoint
        for name, names in self.aliases.items():
            key = next((self.keys.stored[n] for n in names if n in self.keys.stored), None)
            if key is not None:
                self.stored[name] = key
            elif self.originals[name].is_meta:
                raise LoadError(f"the checkpoint in {checkpoint.folder} has no tensor for {name} (nor for "
                                f"{names[1:] or 'any other name'}): it was saved from another model")
        self.live: Dict[str, torch.Tensor] = {}

    def names_under(self, prefix: str) -> List[str]:
        """Canonical names of the stored tensors owned by the module at ``prefix`` (and its children)."""
        start = f"{prefix}." if prefix else ""
        return [name for name in self.stored if name.startswith(start)]

    def check_shapes(self) -> None:
        """Every stored tensor has the shape the config gives the model."""
        for name, key in self.stored.items():
            expected, found = tuple(self.originals[name].shape), self.checkpoint.shape(key)
            if expected != found:
                raise LoadError(f"{key} is {list(found)} in the checkpoint but {list(expected)} in the model the "
                                f"config describes: the folder's config and weights do not belong together")

    def load(self, names: Iterable[str]) -> None:
        """Swap in real values for ``names`` (those already live stay)."""
        wanted = [n for n in names if n not in self.live and n in self.stored]
        values = self.checkpoint.read([self.stored[n] for n in wanted])
        for name in wanted:
            original = self.originals[name]
            value = values[self.stored[name]].to(self.device)
            tensor = nn.Parameter(value, requires_grad=False) if isinstance(original, nn.Parameter) else value
            self._swap(original, tensor)
            self.live[name] = tensor

    def release(self, names: Iterable[str] = ()) -> None:
        """Put the ``meta`` tensors back for ``names`` (default: every live one)."""
        for name in list(names) or list(self.live):
            tensor = self.live.pop(name, None)
            if tensor is not None:
                self._swap(tensor, self.originals[name])
        return_freed_memory()

    def _swap(self, old: torch.Tensor, new: torch.Tensor) -> None:
        holders = self.slots.pop(id(old), [])
        for slots, attr in holders:
            slots[attr] = new
        self.slots[id(new)] = holders

    @contextlib.contextmanager
    def loaded(self, names: Iterable[str]) -> Iterator[None]:
        """The tensors ``names`` real for the block, released after it."""
        names = [n for n in names if n not in self.live]
        try:
            self.load(names)
            yield
        finally:
            self.release(names)


__all__ = ["Materializer", "build_skeleton", "checkpoint_dtype", "load_config", "parameters_on_meta"]
