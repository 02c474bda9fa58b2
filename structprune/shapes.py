"""Shape propagation: run the captured graph once and keep each node's output shape on the node.

Results live in ``node.meta["sp_value"]``:
a :class:`TensorMeta` for tensors, the same nesting for tuples/lists/dicts, and plain Python
values (ints, ``torch.Size``) as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .errors import ExampleInputError

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


class ShapeProp(fx.Interpreter):
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


def propagate_shapes(gm: fx.GraphModule, args: list) -> None:
    """Fill ``node.meta[META_KEY]`` for every node of ``gm``.

    A real forward pass (no autograd) is the fastest way on ordinary models; models whose tensors
    live on the ``meta`` device (too big to materialise) are propagated under ``FakeTensorMode``.
    """
    on_meta = any(t.is_meta for t in gm.parameters()) or any(
        isinstance(a, torch.Tensor) and a.is_meta for a in args)
    if not on_meta:
        with torch.no_grad():
            ShapeProp(gm).run(*args)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.no_grad():
            ShapeProp(gm).run(*fake_args)
