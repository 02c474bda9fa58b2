"""Physical shrinking: slice parameters and buffers, then fix module metadata.

Generic part: every channel space whose elements are partly dropped is ``index_select``-ed on its
dim (parameters stay ``nn.Parameter`` with their ``requires_grad``). Per-class *updaters* (in the op
registry, next to each layer's rule: ``structprune.updater``) then re-derive metadata
(``out_channels``, ``groups``, ``num_features``...) from the new shapes.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..graph.dependency_graph import DependencyGraph
from ..ops.registry import find_updater
from .copying import deep_copy_module
from .size_attributes import refresh_size_attributes


def sliced_tensors(model: nn.Module, dg: DependencyGraph, dropped: np.ndarray) -> Dict[int, torch.Tensor]:
    """New, smaller tensors for every parameter/buffer of ``model`` that loses channels, keyed by
    ``id`` of the tensor they replace. Parameters stay ``nn.Parameter`` with their ``requires_grad``."""
    cuts: Dict[str, List[Tuple[int, np.ndarray]]] = {}
    for space in dg.spaces:
        gone = space.of(dropped)
        if gone.any():
            # a tensor can lose channels on two dims (a conv weight: filters and input channels): collect, slice once
            cuts.setdefault(space.tensor, []).append((space.dim, np.flatnonzero(~gone)))
    replacements: Dict[int, torch.Tensor] = {}
    for name, dims in cuts.items():
        path, _, attr = name.rpartition(".")
        old = getattr(model.get_submodule(path) if path else model, attr)
        # detach: slicing a leaf parameter must not record autograd history into the new one
        new = old.detach()
        for dim, keep in dims:
            new = new.index_select(dim, torch.as_tensor(keep, device=new.device))
        new = in_memory_format_of(old, new)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        replacements[id(old)] = new
    return replacements


def in_memory_format_of(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` laid out like ``old`` when that is channels_last (or channels_last_3d): ``index_select`` returns
    a plain contiguous tensor, and a conv weight that lost its layout silently runs slower (or converts
    every call) in a model the user prepared with ``model.to(memory_format=torch.channels_last)``."""
    for memory_format, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if old.ndim == ndim and old.is_contiguous(memory_format=memory_format) and not old.is_contiguous():
            return new.contiguous(memory_format=memory_format)
    return new


def _slots(model: nn.Module):
    """Every (module, slot dict, slot name, tensor) holding a parameter or buffer."""
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            slots = getattr(module, kind)
            # list(): shrink assigns into these very dicts while iterating
            for name, t in list(slots.items()):
                if t is not None:
                    yield module, slots, name, t


def _refresh_composites(model: nn.Module, touched: Dict[nn.Module, Dict[str, tuple]]) -> None:
    """Run the updaters of modules that own no sliced tensor but hold some that were sliced (``nn.Transformer``'s
    ``d_model`` follows its layers): children before parents, so a parent reads its children's new sizes."""
    for module in reversed(list(model.modules())):  # reversed pre-order: every child comes before its parent
        update = find_updater(module)
        if update is not None and module not in touched and any(m in touched for m in module.modules()):
            update(module, {})


def _refresh_metadata(model: nn.Module, dg: DependencyGraph, dropped: np.ndarray,
                      touched: Dict[nn.Module, Dict[str, tuple]], notes: Optional[List[str]]) -> None:
    for module, old_shapes in touched.items():
        update = find_updater(module)
        if update is not None:
            update(module, old_shapes)
    _refresh_composites(model, touched)
    # head splits compare attributes with their original values: rewrite those before anything else
    for note in refresh_size_attributes(model, dg.head_splits, dropped, touched):
        if notes is not None and note not in notes:
            notes.append(note)
    for path, attribute, elements in dg.widths:  # widths no tensor records
        # an index without an element (-1) can never be dropped, so it always counts as kept
        kept = int((~dropped[elements[elements >= 0]]).sum() + (elements < 0).sum())
        setattr(model.get_submodule(path), attribute, kept)


def shrink(model: nn.Module, dg: DependencyGraph, dropped: np.ndarray,
           notes: Optional[List[str]] = None) -> List[nn.Module]:
    """Remove every dropped element from ``model`` in place; return the modules it touched.
    Anything worth telling (a config field left alone) is appended to ``notes``."""
    replacements = sliced_tensors(model, dg, dropped)
    touched: Dict[nn.Module, Dict[str, tuple]] = {}
    for module, slots, name, t in _slots(model):
        # matched by identity, so a tensor shared by two modules (tied embeddings) gets the same new tensor in
        # both and stays tied
        if id(t) in replacements:
            slots[name] = replacements[id(t)]
            # updaters compare with the old shape (a depthwise conv derives its new groups from it)
            touched.setdefault(module, {})[name] = tuple(t.shape)
    _refresh_metadata(model, dg, dropped, touched, notes)
    return list(touched)


def shrunk_copy(model: nn.Module, dg: DependencyGraph, dropped: np.ndarray,
                notes: Optional[List[str]] = None) -> nn.Module:
    """A deep copy of ``model`` without the dropped elements.

    The sliced tensors are handed to the copy as already copied, so the large original tensors are
    never duplicated only to be thrown away.
    """
    replacements = sliced_tensors(model, dg, dropped)
    old_shape = {id(replacements[id(t)]): tuple(t.shape) for _, _, _, t in _slots(model) if id(t) in replacements}
    # a deepcopy memo maps id(original) -> its copy: seeding it with the sliced tensors makes the copy use
    # them instead of duplicating the originals (dict(): the copy adds entries to its memo)
    twin = deep_copy_module(model, memo=dict(replacements))
    touched: Dict[nn.Module, Dict[str, tuple]] = {}
    for module, _, name, t in _slots(twin):
        if id(t) in old_shape:
            touched.setdefault(module, {})[name] = old_shape[id(t)]
    _refresh_metadata(twin, dg, dropped, touched, notes)
    return twin


@contextlib.contextmanager
def rollback(model: nn.Module):
    """Restore every parameter, buffer and plain attribute of every module if the block raises."""
    # references suffice: shrinking replaces tensors and attributes, it never changes them in place (configs
    # excepted, below). Only public attributes: updaters write out_channels, num_heads and the like
    saved = [(m, dict(m._parameters), dict(m._buffers),
              {k: v for k, v in vars(m).items() if not k.startswith("_")}) for m in model.modules()]
    configs = {id(c): (c, dict(vars(c))) for m in model.modules() for c in [getattr(m, "config", None)]
               if c is not None and not isinstance(c, nn.Module) and hasattr(c, "__dict__")}
    try:
        yield
    except BaseException:
        for config, fields in configs.values():  # configs are rewritten in place
            vars(config).clear()
            vars(config).update(fields)
        for m, params, buffers, attrs in saved:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            # attributes the block added (update_multihead_attention sets head_dim) go too
            for k in [k for k in vars(m) if not k.startswith("_") and k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():
                setattr(m, k, v)
        raise
