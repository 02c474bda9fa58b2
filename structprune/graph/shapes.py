"""Shape propagation: run the captured graph once and keep each node's output shape on the node.

Results live in ``node.meta["sp_value"]``:
a :class:`TensorMeta` for tensors, the same nesting for tuples/lists/dicts, and plain Python
values (ints, ``torch.Size``) as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
from torch import fx, nn

from ..errors import ExampleInputError

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


# ---- shape propagation on the meta device ---------------------------------------------------------------
ShapeFunction = Callable[..., torch.Tensor]
_SHAPE_FUNCTIONS: Dict[type, ShapeFunction] = {}


def shape_function(*classes):
    """Register ``fn(module, *args) -> meta tensor`` computing a module's output without running it."""

    def register(fn: ShapeFunction) -> ShapeFunction:
        for cls in classes:
            _SHAPE_FUNCTIONS[cls] = fn
        return fn

    return register


def _shape_function_for(module: nn.Module):
    cls = type(module)
    for base in cls.__mro__:
        fn = _SHAPE_FUNCTIONS.get(base)
        if fn is not None:
            return fn if cls.forward is base.forward else None
    return None


# parameter-free modules that keep their input's shape (anything with parameters runs on meta
# tensors instead, so that a mismatched input still raises)
_SAME_SHAPE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Tanhshrink, nn.Threshold,
    nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Softmax, nn.LogSoftmax, nn.Softmin,
    nn.modules.dropout._DropoutNd,
)


@shape_function(*_SAME_SHAPE)
def _same_shape(module, x, *args, **kwargs):
    return x


def _checked_same_shape(fits: Callable[[nn.Module, torch.Tensor], bool]) -> ShapeFunction:
    def shape(module, x):
        if not fits(module, x):
            raise RuntimeError(f"{type(module).__name__} does not fit its input")  # the real op explains
        return x

    return shape


shape_function(nn.modules.batchnorm._BatchNorm)(
    _checked_same_shape(lambda m, x: x.ndim >= 2 and x.shape[1] == m.num_features))
shape_function(nn.LayerNorm)(
    _checked_same_shape(lambda m, x: tuple(x.shape[x.ndim - len(m.normalized_shape):]) == tuple(m.normalized_shape)))
shape_function(nn.GroupNorm)(_checked_same_shape(lambda m, x: x.ndim >= 2 and x.shape[1] == m.num_channels))
shape_function(nn.PReLU)(
    _checked_same_shape(lambda m, x: m.num_parameters == 1 or (x.ndim >= 2 and x.shape[1] == m.num_parameters)))


@shape_function(nn.Linear)
def _linear_shape(module, x):
    if x.ndim == 0 or x.shape[-1] != module.in_features:
        raise RuntimeError("linear layer does not fit its input")  # the real op raises the real error
    return x.new_empty(x.shape[:-1] + (module.out_features,))


@shape_function(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_shape(module, x):
    k = len(module.kernel_size)
    if isinstance(module.padding, str):
        padding = [0] * k if module.padding == "valid" else None
    else:
        padding = module.padding
    spatial = []
    for i, size in enumerate(x.shape[-k:]):
        if padding is None:  # "same"
            spatial.append(size)
            continue
        span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        spatial.append((size + 2 * padding[i] - span) // module.stride[i] + 1)
    if min(spatial) <= 0 or x.shape[-k - 1] != module.in_channels:
        raise RuntimeError("convolution does not fit its input")  # let the real op raise its own error
    return x.new_empty(tuple(x.shape[:-k - 1]) + (module.out_channels,) + tuple(spatial))


@shape_function(nn.Flatten)
def _flatten_shape(module, x):
    return torch.flatten(x, module.start_dim, module.end_dim)


class MetaShapeProp(ShapeProp):
    """Shape propagation with meta tensors: no arithmetic, so its cost does not grow with the input.

    Registered modules get their output shape from a formula; others run with their parameters
    swapped for meta copies; functions run on meta tensors directly.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph):
        super().__init__(module, graph=graph)
        self._metas: Dict[int, torch.Tensor] = {}
        self._modules = dict(module.named_modules())

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
        fn = _shape_function_for(module)
        if fn is not None and not (module._forward_hooks or module._forward_pre_hooks):
            return fn(module, *args, **kwargs)
        tensors = {name: self._meta(t) for name, t in
                   list(module.named_parameters()) + list(module.named_buffers())}
        return torch.func.functional_call(module, tensors, tuple(args), dict(kwargs))


def propagate_shapes(trace, args: list) -> None:
    """Fill ``node.meta[META_KEY]`` for every node of a captured graph (a ``trace.Trace``).

    Meta tensors first (constant cost, nothing materialised: fine for models too big for memory);
    a real forward pass (no autograd) when an op needs real data or mixes devices.
    """
    try:
        with torch.no_grad():
            MetaShapeProp(trace.module, trace.graph).run(
                *[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        return
    except Exception:
        pass
    with torch.no_grad():
        ShapeProp(trace.module, graph=trace.graph).run(*args)
