"""Apply a plan one layer at a time, and check each pruned layer against the original layer.

The surgery is the in-memory one (:func:`~structprune.surgery.shrink.shrunk_copy` and
:meth:`~structprune.surgery.compensation.Compensation.fold`) run on the skeleton while only one
unit's tensors are real: every other tensor is on ``meta``, where slicing and copying cost nothing.
So the streamed result is, tensor for tensor, what ``slim`` gives, with one code path for both.

A unit is a block (all its tensors loaded: verification runs it) or one tensor outside the blocks
(embeddings, final norm, head: each loaded alone, and not at all when the plan leaves it unchanged).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
from torch import nn

from ..graph.dependency_graph import DependencyGraph
from ..surgery.compensation import Compensation
from ..surgery.shrink import shrunk_copy
from ..surgery.size_attributes import input_embeddings
from .skeleton import Materializer


class LayerSurgery:
    """The plan ``dropped`` (element mask of ``graph``) applied to the skeleton ``graph.model`` unit by unit."""

    def __init__(self, graph: DependencyGraph, dropped: np.ndarray, compensation: Optional[Compensation],
                 materializer: Materializer, notes: List[str]):
        self.graph, self.dropped, self.compensation = graph, dropped, compensation
        self.materializer, self.notes = materializer, notes
        self.model = graph.model
        self.target = self.pruned_twin()  # all meta: the pruned structure and its refreshed config
        source_keys = set(self.model.state_dict())
        self.canonical = materializer.canonical
        target_state = self.target.state_dict(keep_vars=True)
        # what the folder will hold: the checkpoint's keys as pruned, and the tensors pruning added (biases)
        self.output_keys = {key: tuple(t.shape) for key, t in target_state.items()
                            if key in materializer.keys.stored or key not in source_keys}
        self.new_keys = {key for key in self.output_keys if key not in source_keys}
        self.changed = self._changed_tensors()
        self.written: Set[str] = set()

    def pruned_twin(self) -> nn.Module:
        """A pruned copy of the skeleton: real where the skeleton is real, ``meta`` elsewhere."""
        twin = shrunk_copy(self.model, self.graph, self.dropped, self.notes)
        if self.compensation is not None:
            Compensation.fold(twin, self.compensation.deltas(self.graph, self.dropped), self.notes)
        return twin

    def _changed_tensors(self) -> Set[str]:
        """Canonical names of the tensors the plan slices or whose layer gets a compensation bias."""
        changed = {space.tensor for space in self.graph.spaces if space.of(self.dropped).any()}
        if self.compensation is not None:
            for path in self.compensation.deltas(self.graph, self.dropped):
                changed.update(self.canonical[f"{path}.{attr}"] for attr in ("weight", "bias")
                               if f"{path}.{attr}" in self.canonical)
        return changed

    def keys_under(self, prefix: str) -> List[str]:
        start = f"{prefix}."
        return [key for key in self.output_keys if key.startswith(start)]

    def pruned_tensors(self, keys: List[str]) -> Tuple[Dict[str, torch.Tensor], nn.Module]:
        """The pruned values of ``keys`` (their tensors must be live), and the twin they come from."""
        twin = self.pruned_twin()
        state = twin.state_dict(keep_vars=True)
        values = {key: state[key].detach() for key in keys}
        meta = [key for key, value in values.items() if value.is_meta]
        assert not meta, f"tensors still on meta after loading their unit: {meta[:3]}"
        return values, twin

    def outside_units(self, block_prefixes: List[str]) -> Iterator[Tuple[str, List[str]]]:
        """(canonical tensor, output keys) for every stored tensor outside the blocks, one at a time."""
        inside = tuple(f"{p}." for p in block_prefixes)
        keys = [k for k in self.output_keys if not k.startswith(inside)]
        by_tensor: Dict[str, List[str]] = {}
        for key in keys:
            if key in self.new_keys:
                continue
            by_tensor.setdefault(self.canonical.get(key, key), []).append(key)
        for name, owned in by_tensor.items():
            # a new tensor (a bias compensation added) goes with the weight of its layer
            path = owned[0].rpartition(".")[0]
            owned += [k for k in keys if k in self.new_keys and k.rpartition(".")[0] == path]
            yield name, owned

    def mark_written(self, keys: List[str]) -> None:
        self.written.update(keys)

    def missing(self) -> List[str]:
        return sorted(set(self.output_keys) - self.written)


@contextlib.contextmanager
def zeroed_reference(block: nn.Module, prefix: str, surgery: LayerSurgery) -> Iterator[nn.Module]:
    """The live original ``block`` with every removed channel zeroed and, where bias compensation is on, the
    removed inputs' mean contribution added to the bias of the layers reading them, rounded to the bias's
    dtype as the pruned layer stores it: what the pruned block must reproduce.

    The block's loaded values are zeroed in place (they are released after, never written); the biases
    are put back as they were."""
    graph, dropped, compensation = surgery.graph, surgery.dropped, surgery.compensation
    live = surgery.materializer.live
    saved: List[Tuple[nn.Module, Optional[torch.Tensor]]] = []
    with torch.no_grad():
        if compensation is not None:
            # before zeroing: a contribution reads the removed input columns
            for name, delta in compensation.contributions(graph, dropped).items():
                for path in compensation.owners[name]:
                    if not path.startswith(f"{prefix}."):
                        continue
                    layer = block.get_submodule(path[len(prefix) + 1:])
                    bias = getattr(layer, "bias", None)
                    saved.append((layer, bias))
                    base = bias.detach().double() if isinstance(bias, torch.Tensor) else torch.zeros_like(delta)
                    dtype = getattr(layer, "weight").dtype
                    layer.bias = nn.Parameter((base + delta.to(base.device)).to(dtype), requires_grad=False)
        for space in graph.spaces:
            gone = space.of(dropped)
            if space.tensor in live and space.tensor.startswith(f"{prefix}.") and gone.any():
                index = torch.as_tensor(np.flatnonzero(gone), device=live[space.tensor].device)
                live[space.tensor].data.index_fill_(space.dim, index, 0)
    try:
        yield block
    finally:
        for layer, bias in saved:
            setattr(layer, "bias", bias)


def hidden_keep(surgery: LayerSurgery) -> Optional[torch.Tensor]:
    """Indices of the hidden (residual-stream) channels the pruned model keeps, None when it keeps them all:
    the channels of its input embeddings, which every block reads and writes."""
    weight = getattr(input_embeddings(surgery.model), "weight", None)
    name = next((n for n, p in surgery.model.named_parameters() if p is weight), None) if weight is not None else None
    for space in surgery.graph.spaces:
        if name is not None and space.tensor == surgery.canonical.get(name) and space.dim == 1:
            gone = space.of(surgery.dropped)
            return torch.as_tensor(np.flatnonzero(~gone)) if gone.any() else None
    return None


__all__ = ["LayerSurgery", "hidden_keep", "zeroed_reference"]
