"""Capture a model's graph: torch.fx first, torch.export (non-strict) when fx cannot.

The captured graph is only *read*: pruning is applied to the caller's own modules by name, so the
tracer that ran never shows in the result. Both tracers yield an ``fx.GraphModule`` whose
parameters are reachable under the original fully-qualified names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import fx, nn

from ..errors import ExampleInputError, TraceError
from ..options import TRACERS, check_choice
from .quiet import without_graph_dumps


@dataclass
class Inputs:
    """An example input normalised to positional and keyword arguments."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    @classmethod
    def from_example(cls, example: Any) -> "Inputs":
        if isinstance(example, torch.Tensor):
            return cls((example,), {})
        if isinstance(example, (tuple, list)):
            return cls(tuple(example), {})
        if isinstance(example, dict):
            if not all(isinstance(k, str) for k in example):
                raise ExampleInputError("a dict example input must map argument names (str) to values")
            return cls((), dict(example))
        raise ExampleInputError(
            f"example_input must be a Tensor, a tuple/list of positional arguments or a dict of keyword "
            f"arguments, not {type(example).__name__}"
        )

    def cloned(self) -> "Inputs":
        """A copy whose tensors are fresh, so in-place ops in ``forward`` cannot touch the caller's."""
        fresh = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Inputs(tuple(fresh(a) for a in self.args), {k: fresh(v) for k, v in self.kwargs.items()})


@dataclass
class Trace:
    """A captured graph plus how it was captured."""

    module: nn.Module  # resolves the graph's get_attr / call_module targets
    graph: fx.Graph
    tracer: str  # "fx" or "export"
    inputs: Inputs
    parameter_names: Tuple[str, ...]  # forward() argument feeding each placeholder, in order
    defaults: Dict[str, Any] = field(default_factory=dict)  # values of arguments the input leaves out
    # torch.export gave every tensor inside nested inputs (a list of feature maps) its own placeholder
    flattened: bool = False

    @property
    def gm(self) -> fx.GraphModule:
        """The captured graph as a runnable ``GraphModule`` (built on demand: code generation costs)."""
        return self.module if isinstance(self.module, fx.GraphModule) else fx.GraphModule(self.module, self.graph)

    def run_args(self, inputs: Inputs) -> list:
        """Positional arguments for the graph's placeholders. Tensors are cloned, so an in-place op
        at the start of ``forward`` never reaches the caller's example input."""
        fresh = inputs.cloned()
        if self.flattened:  # export flattens (args, kwargs) as a pytree: one placeholder per leaf, in that order
            return [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf
                    for leaf in torch.utils._pytree.tree_leaves((fresh.args, fresh.kwargs))]
        values = dict(self.defaults)
        values.update(zip(self.parameter_names, fresh.args))
        values.update(fresh.kwargs)
        return [values[name] for name in self.parameter_names]


StandIn = Callable[[nn.Module], Optional[Callable[..., Any]]]


class LeafTracer(fx.Tracer):
    """fx tracer that keeps every module we have a rule for (and torch.nn modules) as a leaf, and
    traces modules that have a traceable stand-in for their forward (``stand_in(module)``) through it."""

    def __init__(self, is_rule_leaf, stand_in: Optional[StandIn] = None):
        super().__init__()
        self._is_rule_leaf = is_rule_leaf
        self._stand_in = stand_in or (lambda module: None)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # containers have no rule of their own: tracing through them exposes the children, which do
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if self._is_rule_leaf(m):
            return True
        return self._stand_in(m) is None and super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: Dict[str, Any]) -> Any:
        replacement = None if self._is_rule_leaf(m) else self._stand_in(m)
        if replacement is not None:
            forward = functools.partial(replacement, m)
        return super().call_module(m, forward, args, kwargs)


@contextlib.contextmanager
def traced_as(model: nn.Module, stand_in: Optional[StandIn]):
    """Give the root module its traceable stand-in while fx traces it: fx reads the root's forward
    from its class, so the instance briefly becomes an instance of a subclass whose forward is the
    stand-in (its parameters, names and everything else stay the same)."""
    replacement = stand_in(model) if stand_in is not None else None
    if replacement is None:
        yield model
        return
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"forward": replacement, "__module__": cls.__module__})
    try:
        yield model
    finally:
        model.__class__ = cls


@contextlib.contextmanager
def mode(model: nn.Module, training: bool):
    """Run with every submodule in the given mode, then restore each module's own flag."""
    # restore each module's own flag, not model.train(old): detection backbones keep frozen BatchNorm in eval
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(model: nn.Module):
    """Run with every submodule in eval mode, then restore each module's own flag."""
    return mode(model, False)


def _fx_trace(model: nn.Module, inputs: Inputs, is_rule_leaf, stand_in: Optional[StandIn] = None) -> Trace:
    sig = inspect.signature(model.forward)
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise TraceError("forward takes *args/**kwargs")
    given = {p.name for p in params[: len(inputs.args)]} | set(inputs.kwargs)
    unknown = set(inputs.kwargs) - {p.name for p in params}
    if unknown:
        raise ExampleInputError(f"forward() has no argument(s) {sorted(unknown)}")
    # omitted arguments are baked in with their defaults: as proxies, HF's ``if return_dict:`` would fail fx
    concrete = {p.name: p.default for p in params if p.name not in given and p.default is not p.empty}
    missing = [p.name for p in params if p.name not in given and p.default is p.empty]
    if missing:
        raise ExampleInputError(f"the example input does not provide forward() argument(s) {missing}")
    tracer = LeafTracer(is_rule_leaf, stand_in)
    with traced_as(model, None if is_rule_leaf(model) else stand_in):
        graph = tracer.trace(model, concrete_args=concrete or None)
    # fx makes one placeholder per forward() argument, in signature order (defaults included)
    return Trace(tracer.root, graph, "fx", inputs, tuple(p.name for p in params), concrete)


def output_tensors(value: Any) -> list:
    """The tensors of a model output, in order, through tuples, lists, dicts, dataclasses and Hugging
    Face ``ModelOutput``s. A KV cache is state the pruned model recomputes at its new width, not a
    result, and is skipped, like ``None`` and plain Python values. Any other object holding tensors
    raises: its tensors would go unprotected."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [x for v in value.values() for x in output_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in output_tensors(v)]
    if hasattr(value, "to_tuple"):  # Hugging Face ModelOutput
        return output_tensors(value.to_tuple())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [x for f in dataclasses.fields(value) for x in output_tensors(getattr(value, f.name))]
    if _is_cache(value) or not _holds_tensors(value):
        return []
    raise TraceError(f"the model returns a {type(value).__name__}, whose tensors cannot be found; return tensors, "
                     f"tuples, lists, dicts or dataclasses")


def _is_cache(value: Any) -> bool:
    # duck-typed (transformers' DynamicCache, StaticCache...) so that transformers need not be imported
    return any(cls.__name__.endswith("Cache") and hasattr(cls, "update") for cls in type(value).__mro__)


def _holds_tensors(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in getattr(value, "__dict__", {}).values())


@contextlib.contextmanager
def tensor_outputs(model: nn.Module):
    """Make ``model`` return only its output tensors while torch.export runs: export rejects output
    objects it cannot flatten (a Hugging Face ``DynamicCache``), and what such objects hold (cached keys
    and values) is state the pruned model recomputes at its new width, not an output to protect."""
    original = model.forward
    own = vars(model).get("forward")  # a forward set on the instance itself, restored afterwards

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return tuple(output_tensors(original(*args, **kwargs)))

    model.forward = forward
    try:
        yield model
    finally:
        if own is None:
            del model.forward  # the class's forward shows through again
        else:
            model.forward = own


def _export_trace(model: nn.Module, inputs: Inputs) -> Trace:
    # a failed export prints its partial graph to stderr; the failure itself reaches the caller as an exception
    with tensor_outputs(model), without_graph_dumps():
        ep = torch.export.export(model, inputs.args, inputs.kwargs, strict=False)
    gm = ep.module()
    sig = inspect.signature(model.forward)
    names = [p.name for p in sig.parameters.values()][: len(inputs.args)] + list(inputs.kwargs)
    # the unlifted module takes the original forward() signature positionally-or-by-keyword
    placeholder_names = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
    if len(names) == len(placeholder_names):
        return Trace(gm, gm.graph, "export", inputs, tuple(names))
    return Trace(gm, gm.graph, "export", inputs, placeholder_names, flattened=True)




def capture(model: nn.Module, inputs: Inputs, is_rule_leaf, training: bool = False, tracer: str = "auto",
            stand_in: Optional[StandIn] = None) -> Trace:
    """Trace ``model`` (in eval mode unless ``training``).

    ``is_rule_leaf(module)`` says which modules stay one node; ``stand_in(module)`` gives a traceable
    replacement for a module's forward that fx follows instead (see ``LeafTracer``).

    ``tracer="auto"`` tries torch.fx, then torch.export (non-strict); ``"fx"`` or ``"export"`` use
    one of them only. Raises TraceError naming every tracer's failure.
    """
    check_choice("tracer", tracer, TRACERS)
    attempts = {"fx": lambda: _fx_trace(model, inputs, is_rule_leaf, stand_in),
                "export": lambda: _export_trace(model, inputs)}
    order = ["fx", "export"] if tracer == "auto" else [tracer]
    failures = []
    with mode(model, training):
        for name in order:
            try:
                return attempts[name]()
            # a wrong example input fails under every tracer: trying torch.export would only bury the real message
            except ExampleInputError:
                raise
            except Exception as error:  # fx fails on data-dependent control flow and friends
                failures.append((name, error))
    details = "".join(f"  torch.{name}: {type(error).__name__}: {_first_line(error)}\n" for name, error in failures)
    raise TraceError(
        f"could not capture the model's graph.\n{details}"
        "Make the failing op traceable (e.g. move data-dependent Python control flow out of "
        "forward, or wrap the offending function with torch.fx.wrap) and try again."
    ) from failures[-1][1]


def _first_line(error: Exception, limit: int = 600) -> str:
    """The error's message, trimmed to ``limit`` characters."""
    text = str(error).strip()
    return text[:limit]
