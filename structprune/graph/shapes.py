"""Shape propagation: run the captured graph once and keep each node's output shape on the node.

Results live in ``node.meta["sp_value"]``:
a :class:`TensorMeta` for tensors, the same nesting for tuples/lists/dicts, and plain Python
values (ints, ``torch.Size``) as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import fx, nn

from ..errors import ExampleInputError
from .interpreter import GraphInterpreter

META_KEY = "sp_value"


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor seen during shape propagation (deliberately not a tuple)."""

    shape: tuple
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        items = [describe(v) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return value


class ShapeProp(GraphInterpreter):
    """Record every node's output description in ``node.meta[META_KEY]``."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as error:
            location = n.stack_trace.strip().splitlines()[-1] if n.stack_trace else repr(n.format_node())
            raise ExampleInputError(
                f"the model cannot run on the example input: op {n.target!r} failed ({type(error).__name__}: "
                f"{str(error).strip()[:300]}) at {location.strip()}"
            ) from error
        n.meta[META_KEY] = describe(result)
        return result


def _has_tensor(meta: Any) -> bool:
    if isinstance(meta, TensorMeta):
        return True
    if isinstance(meta, (list, tuple)):
        return any(_has_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_has_tensor(m) for m in meta.values())
    return False


def fits(label: Any, meta: Any) -> bool:
    """Does a rule's label (see ``labels.Label``) have the structure of the node's value, ``meta``
    (see :func:`describe`)? One array of the axis's length or None per tensor axis, a list per container."""
    if isinstance(meta, TensorMeta):
        return isinstance(label, tuple) and len(label) == meta.ndim and all(
            axis is None or (isinstance(axis, np.ndarray) and axis.shape == (meta.shape[k],))
            for k, axis in enumerate(label))
    if isinstance(meta, (list, tuple)) and not isinstance(meta, torch.Size):
        items = list(meta)
        return label is None and not _has_tensor(meta) or (
            isinstance(label, list) and len(label) == len(items)
            and all(fits(item, item_meta) for item, item_meta in zip(label, items)))
    if isinstance(meta, dict):
        return isinstance(label, list) and len(label) == len(meta) and all(
            fits(item, item_meta) for item, item_meta in zip(label, meta.values()))
    return label is None


# ---- shape propagation on the meta device ---------------------------------------------------------------
ShapeFunction = Callable[..., torch.Tensor]
# module -> its shape function, or None (the op registry's ``shape_function_for``): passed in, so that
# this module knows no op
ShapeLookup = Callable[[nn.Module], Optional[ShapeFunction]]


def _no_formulas(module: nn.Module) -> Optional[ShapeFunction]:
    return None


class MetaShapeProp(ShapeProp):
    """Shape propagation with meta tensors: no arithmetic, so its cost does not grow with the input.

    Registered modules get their output shape from a formula; others run with their parameters
    swapped for meta copies; functions run on meta tensors directly.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph, shape_of: ShapeLookup = _no_formulas):
        super().__init__(module, graph=graph)
        self._metas: Dict[int, torch.Tensor] = {}
        self._modules = dict(module.named_modules())
        self._shape_of = shape_of

    def _meta(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return t
        found = self._metas.get(id(t))
        if found is None:
            found = self._metas[id(t)] = t.to("meta")
        return found

    def fetch_attr(self, target: str) -> Any:
        return self._meta(super().fetch_attr(target))

    def call_module(self, target, args, kwargs) -> Any:
        module = self._modules[target]
        fn = self._shape_of(module)
        # a formula would skip the module's hooks, and a hook may change the output shape: run it then
        if fn is not None and not (module._forward_hooks or module._forward_pre_hooks):
            return fn(module, *args, **kwargs)
        tensors = {name: self._meta(t) for name, t in
                   list(module.named_parameters()) + list(module.named_buffers())}
        return torch.func.functional_call(module, tensors, tuple(args), dict(kwargs))


def propagate_shapes(trace, args: list, shape_of: ShapeLookup = _no_formulas) -> None:
    """Fill ``node.meta[META_KEY]`` for every node of a captured graph (a ``trace.Trace``).

    Meta tensors first (constant cost, nothing materialised: fine for models too big for memory);
    a real forward pass (no autograd) when an op needs real data or mixes devices. ``shape_of``
    gives the modules whose output shape a formula computes (the others run on meta tensors).
    """
    try:
        with torch.no_grad():
            MetaShapeProp(trace.module, trace.graph, shape_of).run(
                *[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        return
    # meta fails on ops that need data (``.item()``, nonzero) or mix devices: fall back to a real forward
    except Exception:
        pass
    with torch.no_grad():
        ShapeProp(trace.module, graph=trace.graph).run(*args)
