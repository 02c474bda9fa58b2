"""The op-rule registry.

A rule is a small function ``rule(ctx: RuleContext, node) -> Label`` that maps the channel labels of
a node's inputs to the label of its output, unifying, freezing or marking elements on the way.
Rules are registered by *target*:

* a module class (``nn.Conv2d``): used for fx ``call_module`` nodes, including subclasses that
  do not override ``forward``;
* a Python callable (``torch.flatten``, ``F.relu``, ``operator.add``): fx ``call_function``;
* a method name string (``"view"``): fx ``call_method``; a trailing ``_`` (in-place) is ignored;
* an ATen name string (``"aten.conv2d"``): torch.export ``call_function`` nodes.

A new layer type is one new rule, never an edit to the core.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import fx, nn

_MODULE_RULES: Dict[type, Callable] = {}
_CALLABLE_RULES: Dict[object, Callable] = {}
_NAME_RULES: Dict[str, Callable] = {}


def rule(*targets) -> Callable:
    """Register the decorated function as the rule for every given target."""

    def register(fn: Callable) -> Callable:
        for target in targets:
            if isinstance(target, type) and issubclass(target, nn.Module):
                _MODULE_RULES[target] = fn
            elif isinstance(target, str):
                _NAME_RULES[target] = fn
            else:
                _CALLABLE_RULES[target] = fn
        return fn

    return register


def module_rule(module: nn.Module) -> Optional[Callable]:
    """The rule of the closest registered class whose ``forward`` the module still uses."""
    cls = type(module)
    for base in cls.__mro__:
        fn = _MODULE_RULES.get(base)
        if fn is not None:
            return fn if cls.forward is base.forward else None
        if base is nn.Module:
            return None
    return None


def has_module_rule(module: nn.Module) -> bool:
    return module_rule(module) is not None


# In-place variants of these change the *shape* of a tensor other nodes still refer to: no rule
# can relabel those earlier references, so they stay unknown (their channels are frozen).
_INPLACE_RESHAPES = {"transpose", "t", "unsqueeze", "squeeze", "resize", "resize_as", "as_strided", "swapaxes",
                     "swapdims", "set"}


def _strip_inplace(name: str) -> str:
    if name.endswith("_") and not name.endswith("__"):
        return "" if name[:-1] in _INPLACE_RESHAPES else name[:-1]
    return name


def lookup(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[Callable]:
    """Find the rule for an fx node (None: no rule, the node's channels get frozen)."""
    if node.op == "call_module":
        return module_rule(modules[node.target])
    if node.op == "call_method":
        return _NAME_RULES.get("." + _strip_inplace(node.target))
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            name = target.overloadpacket.__name__
            return _NAME_RULES.get("aten." + name) or _NAME_RULES.get("aten." + _strip_inplace(name))
        if isinstance(target, torch._ops.OpOverloadPacket):
            return _NAME_RULES.get("aten." + _strip_inplace(target.__name__))
        if isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields"):
            return _NAME_RULES.get("namedtuple")  # output containers such as GoogLeNetOutputs
        try:
            return _CALLABLE_RULES.get(target)
        except TypeError:  # unhashable target
            return None
    return None


def op_name(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    """A readable name of a node's operation, used in reports."""
    if node.op == "call_module":
        return type(modules[node.target]).__qualname__
    if node.op == "call_method":
        return "Tensor." + node.target
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', repr(target))}".lstrip(".")
