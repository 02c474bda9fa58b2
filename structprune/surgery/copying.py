"""A deep copy of a module tree that is much faster than ``copy.deepcopy``.

``copy.deepcopy`` walks every module through the generic pickle protocol (``__reduce_ex__``), which
dominates the cost of copying a network with hundreds of small layers. Here each plain module is
rebuilt directly: child modules recursively, parameters and buffers cloned (or taken from ``memo``,
which is how already-pruned tensors are slotted in), immutable attributes shared, and everything
else handed to ``copy.deepcopy`` with the same ``memo``, so sharing and independence are exactly
those of a deep copy. Modules that customise copying or pickling are copied with ``deepcopy``.
"""
from __future__ import annotations

import collections
import copy
import types
from typing import Any, Dict, Optional

import torch
from torch import nn

# values deepcopy itself returns as they are: sharing them is exactly what a deep copy does
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, torch.Size, range,
              type, types.FunctionType, types.BuiltinFunctionType, torch.memory_format, torch.layout)


_CONTAINERS = (dict, list, set, collections.OrderedDict)


def _customises_copy(cls: type) -> bool:
    """Does the class change how it is copied or pickled (beyond torch's own compatibility hooks)?"""
    if getattr(cls, "__deepcopy__", None) is not None or cls.__reduce_ex__ is not object.__reduce_ex__ \
            or cls.__reduce__ is not object.__reduce__:
        return True
    for name in ("__getstate__", "__setstate__"):
        owner = next((base for base in cls.__mro__ if name in vars(base)), object)
        # torch's own __setstate__ only patches old pickles; one from model code may rebuild state a direct copy skips
        if owner is not object and not owner.__module__.startswith("torch."):
            return True
    return False


def _copy_tensor(t: Any, memo: Dict[int, Any]) -> Any:
    if t is None:
        return None
    found = memo.get(id(t))
    if found is not None:
        return found
    # exact types only: tensor subclasses and non-leaf tensors go through deepcopy, which knows their rules
    new: torch.Tensor
    if type(t) is nn.Parameter:
        new = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
    elif type(t) is torch.Tensor and not t.requires_grad:
        new = t.clone()
    else:
        new = copy.deepcopy(t, memo)
    # a tensor reached twice (tied weights) is copied once and stays shared in the copy
    memo[id(t)] = new
    return new


def _is_immutable(value: Any) -> bool:
    if type(value) in _IMMUTABLE:
        return True
    return type(value) is tuple and all(type(v) in _IMMUTABLE for v in value)


def deep_copy_module(module: nn.Module, memo: Optional[Dict[int, Any]] = None) -> nn.Module:
    """Equivalent to ``copy.deepcopy(module, memo)``, several times faster on large module trees."""
    memo = {} if memo is None else memo
    found = memo.get(id(module))
    if found is not None:
        return found
    cls = type(module)
    if _customises_copy(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    # registered before the children are copied, so a child that refers back to this module gets the copy
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = type(value)((name, None if child is None else deep_copy_module(child, memo))
                                     for name, child in value.items())
        elif key in ("_parameters", "_buffers"):
            state[key] = type(value)((name, _copy_tensor(t, memo)) for name, t in value.items())
        elif _is_immutable(value):
            state[key] = value
        elif type(value) in _CONTAINERS and not value:  # the many empty hook dicts of every module
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device."""
    memo: Dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        # once per tensor: tied weights get one meta tensor, as a deep copy would give them one copy
        if id(t) not in memo:
            meta = t.detach().to("meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return deep_copy_module(model, memo)
