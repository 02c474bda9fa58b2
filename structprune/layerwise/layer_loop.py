"""The layer loop: run calibration batches through a model one repeated block at a time.

Every large-model method that calibrates (FLAP, Wanda, SparseGPT, SliceGPT) runs its data this way:
embed the tokens, then for each decoder layer load its weights, run the hidden states that enter it,
keep what comes out as the next layer's input, and free the layer. Peak memory is one layer, the
modules outside the layers (embeddings, final norm, head) and the hidden states, whatever the depth.

The modules outside the blocks are not special-cased: the model's own ``forward`` runs, the first
block's inputs are captured by a pre-hook that stops the forward (so every keyword the model gives
its layers, position embeddings and masks included, is recorded), and the modules it calls are
filled with real weights on their first call. The head's inputs come the same way: the model's
``forward`` runs again with each block answering from the recorded outputs.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import StructPruneError
from ..scoring.activations import run_batch
from .skeleton import Materializer

logger = logging.getLogger("structprune")


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the ``nn.ModuleList`` of same-class modules holding the most parameters
    (a decoder's layers)."""
    best: Optional[Tuple[int, str, nn.ModuleList]] = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, path, module)
    if best is None:
        raise StructPruneError(f"{type(model).__name__} has no list of repeated blocks to run one at a time")
    return best[1], best[2]


class _Stop(Exception):
    """Raised by the capture hook to end the model's forward at the first block."""


@dataclass
class BlockCall:
    """How the model called its first block for one batch: the arguments, with the hidden states taken out."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    positional: bool  # the hidden states are args[0] (else kwargs["hidden_states"])
    returns_tuple: bool = False  # the block answers (hidden_states, ...) rather than a tensor

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.positional:
            output = block(hidden, *self.args, **self.kwargs)
        else:
            output = block(*self.args, hidden_states=hidden, **self.kwargs)
        self.returns_tuple = not isinstance(output, torch.Tensor)
        return output if isinstance(output, torch.Tensor) else output[0]


class HiddenStates:
    """Per batch, the hidden states between two blocks: in memory, or in files under ``folder`` once they
    pass ``memory_limit`` bytes (read back one batch at a time)."""

    def __init__(self, memory_limit: int, folder: Optional[Path] = None):
        self.memory_limit, self.folder = memory_limit, folder
        self._memory: Dict[int, torch.Tensor] = {}
        self._bytes = 0

    def __setitem__(self, index: int, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self.folder is not None and self._bytes + size > self.memory_limit:
            from safetensors.torch import save_file
            save_file({"hidden": hidden.detach().cpu().contiguous()}, str(self.folder / f"{id(self)}-{index}.st"))
            self._memory.pop(index, None)
            return
        self._memory[index] = hidden.detach()
        self._bytes += size

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self._memory:
            return self._memory[index]
        assert self.folder is not None
        from safetensors.torch import load_file
        return load_file(str(self.folder / f"{id(self)}-{index}.st"))["hidden"]


class LayerLoop:
    """Calibration batches run through ``model`` (a skeleton whose weights ``materializer`` reads), one block
    at a time; ``device``: where the blocks compute.

    ``activation_memory``: bytes of hidden states kept in memory; past it they go to a temporary folder.
    """

    def __init__(self, model: nn.Module, materializer: Materializer, batches: Sequence[Any],
                 device: "str | torch.device" = "cpu", activation_memory: int = 2 * 2 ** 30):
        self.model, self.materializer = model, materializer
        self.device = torch.device(device)
        self.batches = [self._to_device(b) for b in batches]
        if not self.batches:
            raise StructPruneError("the calibration data yielded no batches; pass a non-empty data=...")
        self.blocks_path, self.blocks = find_blocks(model)
        self.block_prefixes = [f"{self.blocks_path}.{i}" if self.blocks_path else str(i)
                               for i in range(len(self.blocks))]
        self.activation_memory = activation_memory
        self._spill = tempfile.TemporaryDirectory(prefix="structprune-hidden-")
        self.calls: List[BlockCall] = []
        self.answers: Dict[str, List[Any]] = {}  # module path -> its output per batch, recorded by capture
        self.first_input: Optional[torch.Tensor] = None  # batch 0's hidden states entering the first block

    def _to_device(self, batch: Any) -> Any:
        return torch.utils._pytree.tree_map(
            lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, batch)

    def new_states(self) -> HiddenStates:
        return HiddenStates(self.activation_memory, Path(self._spill.name))

    def close(self) -> None:
        self._spill.cleanup()

    # ----- the modules outside the blocks -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _outside_blocks_on_call(self) -> Iterator[None]:
        """Modules outside the blocks get their weights when the forward first calls them; all are freed after."""
        handles, loaded = [], []
        for path, own in self._stored_outside().items():
            def load(_module: nn.Module, _args: Any, names: List[str] = own) -> None:
                self.materializer.load(names)
                loaded.extend(names)
            handles.append(self.model.get_submodule(path).register_forward_pre_hook(load))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.materializer.release(loaded)

    def capture(self, batches: Optional[int] = None) -> HiddenStates:
        """Run the model up to its first block on every batch (or the first ``batches``); record how the block
        is called."""
        states = self.new_states()
        self.calls = []

        def stop(_module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            if args:
                states[len(self.calls)] = args[0]
                self.calls.append(BlockCall(args[1:], dict(kwargs), True))
            else:
                kwargs = dict(kwargs)
                states[len(self.calls)] = kwargs.pop("hidden_states")
                self.calls.append(BlockCall((), kwargs, False))
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
        # what the weighted modules before the first block answer (the embeddings' output), so that replaying the
        # head never loads them again
        self.answers = {path: [] for path in self._stored_outside()}
        recorders = [self.model.get_submodule(path).register_forward_hook(
            lambda _m, _a, output, kept=kept: kept.append(output)) for path, kept in self.answers.items()]
        try:
            with self._outside_blocks_on_call(), torch.no_grad():
                for batch in self.batches[:batches]:
                    try:
                        run_batch(self.model, batch, use_cache=False)
                    except _Stop:
                        continue
                    raise StructPruneError("the model's forward never called its first block")
        finally:
            handle.remove()
            for recorder in recorders:
                recorder.remove()
        self.answers = {path: kept for path, kept in self.answers.items() if len(kept) == len(self.calls)}
        self.first_input = states[0]
        return states

    def _stored_outside(self) -> Dict[str, List[str]]:
        """Module path -> canonical names of the stored tensors it owns itself, for the modules outside the blocks
        that own any (embeddings, final norm, head)."""
        inside = tuple(f"{p}." for p in self.block_prefixes)
        found = {}
        for path, module in self.model.named_modules():
            if path in self.block_prefixes or path.startswith(inside):
                continue
            own = [self.materializer.canonical[f"{path}.{n}" if path else n]
                   for n, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None]
            own = [name for name in own if name in self.materializer.stored]
            if own:
                found[path] = own
        return found

    def run_block(self, index: int, states: HiddenStates, only: Optional[int] = None) -> HiddenStates:
        """Run block ``index`` (its weights live) on every batch's hidden states (or batch ``only``)."""
        block, out = self.blocks[index], self.new_states()
        with torch.no_grad():
            for b, call in enumerate(self.calls):
                if only is None or b == only:
                    out[b] = call.run(block, states[b])
        return out

    def replay_head(self, states: HiddenStates) -> None:
        """Run the model's forward again with every block answering with ``states`` (the last block's outputs),
        so the modules after the blocks (final norm, head) see what they see in a whole forward."""
        current = {"batch": 0}

        as_tuple = any(call.returns_tuple for call in self.calls)

        def answer(*_args: Any, **_kwargs: Any) -> Any:
            hidden = states[current["batch"]]
            return (hidden,) if as_tuple else hidden

        for block in self.blocks:
            block.forward = answer  # an instance attribute: nn.Module.__call__ finds it before the class's forward
        before = [self.model.get_submodule(path) for path in self.answers]
        for module, kept in zip(before, self.answers.values()):
            module.forward = lambda *_a, kept=kept, **_k: kept[current["batch"]]
        try:
            with self._outside_blocks_on_call(), torch.no_grad():
                for b, batch in enumerate(self.batches):
                    current["batch"] = b
                    run_batch(self.model, batch, use_cache=False)
        finally:
            for module in [*self.blocks, *before]:
                del module.forward


__all__ = ["BlockCall", "HiddenStates", "LayerLoop", "find_blocks"]
