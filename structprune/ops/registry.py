"""The op registry: one :class:`OpSpec` per target, holding everything structprune knows about it.

A spec names its *target* and up to seven facts about it:

* ``rule(ctx: RuleContext, node) -> Label``: maps the channel labels of a node's inputs to the label
  of its output, unifying, freezing or marking elements on the way;
* ``shape(module, *args) -> meta tensor``: the module's output computed without running it;
* ``update(module, old_shapes)``: refreshes module metadata (``out_channels``...) after slicing;
* ``width``: the attribute that states the layer's output width (``"out_channels"``);
* ``input_axes``: parameter name -> the dim that consumes the input channels (``{"weight": 1}``);
* ``weighted``: its ``weight`` is a default target of element masks;
* ``traced_forward(module, *args, **kwargs)``: a stand-in for a module's ``forward`` that fx can
  trace (same signature, same result), for modules whose own forward cannot be traced (fast paths
  that branch on tensor properties): capture traces into the module through it instead of keeping
  it as one opaque leaf, so its children's rules apply. Used only to capture the graph; the
  pruned model still runs the module's own forward.

Targets are

* a module class (``nn.Conv2d``), or its ``"module.QualName"`` string for a library that need not be
  imported: used for fx ``call_module`` nodes and for the modules of a model;
* a Python callable (``torch.flatten``, ``F.relu``, ``operator.add``): fx ``call_function``;
* a method name string (``".view"``): fx ``call_method``; a trailing ``_`` (in-place) is ignored;
* an ATen name string (``"aten.conv2d"``), or ``"namespace::name"`` for an operator a library defines
  with ``torch.library`` (``"transformers::grouped_mm_fallback"``): torch.export ``call_function`` nodes;
* ``"namedtuple"``: building a named-tuple output container.

A new layer type is one new spec, never an edit to the core. Facts about a module class are
resolved along its MRO: a rule or shape function only applies while the class still uses the
``forward`` of the class it was registered for (a subclass that overrides ``forward`` may compute
anything); updaters, widths, input axes and ``weighted`` apply to every subclass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Union,
)

import torch
from torch import fx, nn

from ..errors import InvalidOptionError

Rule = Callable[..., Any]
ShapeFunction = Callable[..., torch.Tensor]
Updater = Callable[[nn.Module, Dict[str, tuple]], None]
Target = Any  # a module class, a callable, or one of the strings described above

FIELDS = ("rule", "shape", "update", "width", "input_axes", "weighted", "traced_forward")
# facts that only hold while a subclass keeps the registered class's forward
_FORWARD_BOUND = ("rule", "shape", "traced_forward")
STRICT_ENV = "STRUCTPRUNE_STRICT_RULES"
TARGET_KINDS = ("module", "function", "method", "aten", "operator", "container")


@dataclass(frozen=True)
class OpSpec:
    """Everything structprune knows about one target (``None``: not stated for this target)."""

    target: Target
    rule: Optional[Rule] = None
    shape: Optional[ShapeFunction] = None
    update: Optional[Updater] = None
    width: Optional[str] = None
    input_axes: Optional[Mapping[str, int]] = None
    weighted: Optional[bool] = None
    traced_forward: Optional[Callable[..., Any]] = None
    doc: str = ""

    @property
    def name(self) -> str:
        return target_name(self.target)

    @property
    def kind(self) -> str:
        """``"module"``, ``"function"``, ``"method"``, ``"aten"``, ``"operator"`` or ``"container"``."""
        return target_kind(self.target)

    @property
    def summary(self) -> str:
        """``doc``, or the first line of the rule's docstring."""
        text = self.doc or (getattr(self.rule, "__doc__", None) or "")
        return text.strip().splitlines()[0] if text.strip() else ""


_SPECS: Dict[Target, OpSpec] = {}
_CLASS_NAMES: set = set()  # "module.QualName" keys, so lookups only format names when some exist
_RESOLVED: Dict[type, OpSpec] = {}  # class -> its effective spec; cleared on every registration
_QUIET = [0]  # > 0 inside override(): its own registrations do not warn
_STRICT: List[Optional[bool]] = [None]  # None: follow the STRUCTPRUNE_STRICT_RULES environment variable
# library -> the structprune module registering rules for its functions, imported once the library is
_DEFERRED: Dict[str, str] = {}
_LOADED: List[Dict[Target, OpSpec]] = []  # the specs each deferred module registered, in load order


# ---- targets ----------------------------------------------------------------------------------------------
def target_kind(target: Target) -> str:
    """``"module"``, ``"function"``, ``"method"``, ``"aten"``, ``"operator"`` (a library's ``"namespace::name"``)
    or ``"container"`` (see the module docstring)."""
    if isinstance(target, type) and issubclass(target, nn.Module):
        return "module"
    if isinstance(target, str):
        if target.startswith("aten."):
            return "aten"
        if "::" in target:
            return "operator"
        if target.startswith("."):
            return "method"
        return "container" if target == "namedtuple" else "module"
    return "function"


def target_name(target: Target) -> str:
    """A readable name: ``torch.nn.modules.conv.Conv2d``, ``torch.nn.functional.relu``, ``.view``."""
    if isinstance(target, str):
        return target
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def _aten_exists(name: str) -> bool:
    try:
        getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def aten_forms(names: Iterable[str]) -> Tuple[str, ...]:
    """``"aten.<name>"`` for each of ``names`` that ATen defines: the export forms of a list of
    method names (``x.float()`` has no ATen operator of its own)."""
    return tuple("aten." + name for name in names if _aten_exists(name))


def _checked(target: Target) -> Target:
    """The target as a registry key, or a clear error saying what a target may be."""
    if isinstance(target, str):
        if target.startswith("aten.") and not _aten_exists(target[5:]):
            raise InvalidOptionError(f"{target!r} names no ATen operator (torch.ops.aten has no {target[5:]!r}); "
                                     f"use a name from torch.ops.aten, or register the Python callable instead")
        if "::" in target:
            return target  # a library's operator: it exists once the library registers it, maybe later than this
        if not (target.startswith(".") or target == "namedtuple" or "." in target.strip(".")):
            raise InvalidOptionError(f"target {target!r} is not '.method', 'aten.op' or 'module.ClassName'")
        return target
    try:
        hash(target)
    except TypeError:
        raise InvalidOptionError(f"target {target!r} is not hashable, so it cannot be looked up") from None
    return target


# ---- registration -----------------------------------------------------------------------------------------
def register_op(*targets: Target, doc: str = "", **facts: Any) -> None:
    """Record ``facts`` (any of :data:`FIELDS`) for every target; facts left out keep their value.

    Replacing a fact a target already has with a different one warns: two rules for one target
    are usually a mistake, and the one registered last silently wins (use :func:`override` in tests).
    """
    unknown = sorted(set(facts) - set(FIELDS))
    if unknown:
        raise InvalidOptionError(f"unknown op facts {unknown}; an OpSpec states {list(FIELDS)}")
    given = {name: value for name, value in facts.items() if value is not None}
    for target in targets:
        key = _checked(target)
        old = _SPECS.get(key) or OpSpec(key)
        # re-registering the same function (a module imported twice) is no conflict: only a different value warns
        replaced = [name for name, value in given.items() if getattr(old, name) not in (None, value)]
        if replaced and not _QUIET[0]:
            warnings.warn(f"{target_name(key)}: registering a new {' and '.join(replaced)} replaces the one "
                          f"registered before", stacklevel=3)
        _SPECS[key] = dataclasses.replace(old, doc=doc or old.doc, **given)
        if isinstance(key, str) and target_kind(key) == "module":
            _CLASS_NAMES.add(key)
    _RESOLVED.clear()


def rule(*targets: Target) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule for every given target."""
    for target in targets:  # at the decorator line, before the function it decorates is even defined
        _checked(target)

    def register(fn: Rule) -> Rule:
        register_op(*targets, rule=fn)
        return fn

    return register


def updater(*classes: Target) -> Callable[[Updater], Updater]:
    """Register ``fn(module, old_shapes)`` to refresh metadata of ``classes`` after slicing. A class
    may be given as its ``"module.QualName"`` string, so a library need not be imported to register."""

    for cls in classes:
        if target_kind(cls) != "module" or (not isinstance(cls, (type, str))):
            raise InvalidOptionError(f"updaters are registered for module classes (nn.Conv2d) or their "
                                     f"'module.QualName' strings, got {cls!r}")

    def register(fn: Updater) -> Updater:
        register_op(*classes, update=fn)
        return fn

    return register


@contextlib.contextmanager
def override(*targets: Target, **facts: Any) -> Iterator[None]:
    """Within the block, ``targets`` have ``facts`` (without the overwrite warning); on exit the
    registry is as before, whatever was registered inside. With no targets it only restores:

    >>> with override(torch.fliplr, rule=my_fliplr_rule):
    ...     sp.slim(model, x, 0.5)
    """
    load_deferred_rules()  # loaded inside the block, they would be lost with the block's registrations
    # a shallow copy suffices: specs are frozen dataclasses, replaced and never mutated
    saved, saved_names, loaded = dict(_SPECS), set(_CLASS_NAMES), len(_LOADED)
    try:
        _QUIET[0] += 1
        try:
            if targets:
                register_op(*targets, **facts)
        finally:
            _QUIET[0] -= 1
        yield
    finally:
        _SPECS.clear()
        _SPECS.update(saved)
        _CLASS_NAMES.clear()
        _CLASS_NAMES.update(saved_names)
        for specs in _LOADED[loaded:]:  # a library first imported inside the block keeps its rules
            _SPECS.update(specs)
        _RESOLVED.clear()


def list_ops(kind: Optional[str] = None) -> List[OpSpec]:
    """Every registered spec (of one ``kind``: ``"module"``, ``"function"``, ``"method"``, ``"aten"``,
    ``"operator"``, ``"container"``), sorted by kind and name."""
    if kind is not None and kind not in TARGET_KINDS:
        raise InvalidOptionError(f"kind must be one of {', '.join(map(repr, TARGET_KINDS))} or None; got {kind!r}")
    load_deferred_rules()
    specs = [spec for spec in _SPECS.values() if kind is None or spec.kind == kind]
    return sorted(specs, key=lambda spec: (spec.kind, spec.name))


# ---- rules for libraries imported later -------------------------------------------------------------------
def register_when_imported(library: str, module: str) -> None:
    """Import ``module``, which registers rules keyed by ``library``'s own functions, once ``library`` is imported.

    A rule for a function needs the function object, so registering it imports its library; doing that
    with ``import structprune`` would cost every user the library's start-up (torchvision: seconds).
    A model that calls the function has imported the library before it is traced, so the rules are
    registered at the first lookup after that (and by :func:`list_ops`). Modules and classes need no
    deferral: they register by their ``"module.QualName"`` string."""
    _DEFERRED[library] = module
    load_deferred_rules()


def load_deferred_rules() -> None:
    """Register the rules deferred by :func:`register_when_imported` whose library is imported by now."""
    if not _DEFERRED:
        return
    for library in [name for name in _DEFERRED if name in sys.modules]:
        module = _DEFERRED.pop(library)  # popped first: the import below registers, and never runs twice
        before = dict(_SPECS)
        importlib.import_module(module)
        _LOADED.append({key: spec for key, spec in _SPECS.items() if before.get(key) is not spec})


# ---- strict rules -----------------------------------------------------------------------------------------
def rules_are_strict() -> bool:
    """Should a rule that raises fail the analysis instead of freezing its channels?"""
    if _STRICT[0] is not None:
        return _STRICT[0]
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


@contextlib.contextmanager
def strict_rules(enabled: bool = True) -> Iterator[None]:
    """Within the block a rule that raises (or returns a wrongly shaped label) fails loudly, as in
    development and tests; ``strict_rules(False)`` restores the lenient default (freeze and go on)
    even where ``STRUCTPRUNE_STRICT_RULES=1`` is set."""
    previous = _STRICT[0]
    _STRICT[0] = enabled
    try:
        yield
    finally:
        _STRICT[0] = previous


# ---- module classes ---------------------------------------------------------------------------------------
def _own_specs(base: type) -> List[OpSpec]:
    found = [_SPECS[base]] if base in _SPECS else []
    if _CLASS_NAMES:
        # a spec keyed by "module.QualName" (transformers' Conv1D) matches without importing that library
        named = _SPECS.get(f"{base.__module__}.{base.__qualname__}")
        if named is not None:
            found.append(named)
    return found


def _resolve(cls: type) -> OpSpec:
    facts: Dict[str, Any] = {}
    for base in cls.__mro__:
        for spec in _own_specs(base):
            for name in FIELDS:
                value = getattr(spec, name)
                # the MRO runs from the class itself outwards: the closest class stating a fact wins
                if name in facts or value is None:
                    continue
                # a subclass with its own forward may compute anything: the formula does not hold
                bound = name in _FORWARD_BOUND and getattr(cls, "forward") is not getattr(base, "forward")
                facts[name] = None if bound else value
    return OpSpec(cls, **{name: value for name, value in facts.items() if value is not None})


def module_spec(module: Union[nn.Module, type, None]) -> OpSpec:
    """The facts that hold for ``module`` (or a module class), each from its closest registered class."""
    cls = module if isinstance(module, type) else type(module)
    spec = _RESOLVED.get(cls)
    if spec is None:
        spec = _RESOLVED[cls] = _resolve(cls)
    return spec


def module_rule(module: nn.Module) -> Optional[Rule]:
    """The label rule of a module call (None: its channels are frozen, or fx traces into it)."""
    return module_spec(module).rule


def has_module_rule(module: nn.Module) -> bool:
    """Does a rule cover the module? Then capture keeps it as one leaf node instead of tracing into it."""
    return module_spec(module).rule is not None


def traced_forward_for(module: nn.Module) -> Optional[Callable[..., Any]]:
    """The traceable stand-in for the module's forward (None: trace its own forward, or keep it a leaf)."""
    return module_spec(module).traced_forward


def shape_function_for(module: nn.Module) -> Optional[ShapeFunction]:
    """The formula for the module's output on the meta device (None: run it on meta tensors)."""
    return module_spec(module).shape


def find_updater(module: nn.Module) -> Optional[Updater]:
    """What refreshes the module's metadata after its tensors were sliced (None: nothing to refresh)."""
    return module_spec(module).update


def input_axis(module: Optional[nn.Module], attribute: str) -> Optional[int]:
    """The dim of ``module.<attribute>`` that consumes the input channels (None: it reads none)."""
    if module is None:
        return None
    axes = module_spec(module).input_axes
    return None if axes is None else axes.get(attribute)


def width_of(module: nn.Module) -> Optional[int]:
    """The layer's output width (``out_channels``, ``out_features``...), None for other modules."""
    attribute = module_spec(module).width
    return None if attribute is None else getattr(module, attribute, None)


def is_weighted(module: nn.Module) -> bool:
    """Is the module's ``weight`` a default target of element masks?"""
    return bool(module_spec(module).weighted)


def weighted_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every weighted layer (see :func:`is_weighted`) that has a weight."""
    return [(name, m) for name, m in model.named_modules()
            if is_weighted(m) and getattr(m, "weight", None) is not None]


# ---- graph nodes ------------------------------------------------------------------------------------------
# In-place variants of these change the *shape* of a tensor other nodes still refer to: no rule
# can relabel those earlier references, so they stay unknown (their channels are frozen).
_INPLACE_RESHAPES = {"transpose", "t", "unsqueeze", "squeeze", "resize", "resize_as", "as_strided", "swapaxes",
                     "swapdims", "set"}


def _strip_inplace(name: str) -> str:
    if name.endswith("_") and not name.endswith("__"):
        # "" matches no rule: the node is unknown and its channels freeze (dunders like __add__ keep their name)
        return "" if name[:-1] in _INPLACE_RESHAPES else name[:-1]
    return name


def _rule_of(key: Any) -> Optional[Rule]:
    spec = _SPECS.get(key)
    return None if spec is None else spec.rule


def lookup(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[Rule]:
    """Find the rule for an fx node (None: no rule, the node's channels get frozen)."""
    if node.op == "call_module":
        return module_rule(modules[str(node.target)])
    if node.op == "call_method":
        return _rule_of("." + _strip_inplace(str(node.target)))
    if node.op == "call_function":
        load_deferred_rules()
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            name = target.overloadpacket.__name__
            if target.namespace != "aten":  # a library's torch.library operator
                return _rule_of(f"{target.namespace}::{name}")
            # ``aten.add.Tensor``: the packet name (add) is the key; an in-place ``add_`` falls back to ``add``'s rule
            return _rule_of("aten." + name) or _rule_of("aten." + _strip_inplace(name))
        if isinstance(target, torch._ops.OpOverloadPacket):
            return _rule_of("aten." + _strip_inplace(target.__name__))
        if isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields"):
            return _rule_of("namedtuple")  # output containers such as GoogLeNetOutputs
        try:
            return _rule_of(target)
        except TypeError:  # unhashable target
            return None
    return None


def op_name(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    """A readable name of a node's operation, used in reports."""
    if node.op == "call_module":
        return type(modules[str(node.target)]).__qualname__
    if node.op == "call_method":
        return "Tensor." + str(node.target)
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', repr(target))}".lstrip(".")
