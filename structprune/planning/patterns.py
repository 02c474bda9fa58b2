"""Which modules an ``ignore`` or ``ratios`` entry names, and the check that every entry names some.

An entry (a *rule*) is a module name or an fnmatch glob (``"layer4"``, ``"layer4.*"``), a module
instance (``model.layer4``) or a module class (``nn.Embedding``). It covers a module when it names the
module itself *or any module above it*: ``ignore=["layer4"]`` and ``ignore=[model.layer4]`` keep
``layer4.0.conv1`` whole, which is what a user writing a parent means. An entry that names no module
of the model at all is a typo or a pattern written for another model; :func:`check_rules_match`
raises for it instead of letting the option silently do nothing.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, Union

from torch import nn

from ..errors import InvalidOptionError

Rule = Union[str, nn.Module, Type[nn.Module]]
Modules = Mapping[str, nn.Module]


def all_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Path -> module for every module of ``model``, a shared module under each of its paths."""
    return dict(model.named_modules(remove_duplicate=False))


def lineage(name: str) -> List[str]:
    """``name`` and the paths of the modules above it, innermost first, the root (``""``) last:
    ``"a.b.c"`` -> ``["a.b.c", "a.b", "a", ""]``."""
    paths = []
    while name:
        paths.append(name)
        name = name.rpartition(".")[0]
    return paths + [""]


def names_directly(path: str, module: Optional[nn.Module], rule: Rule) -> bool:
    """Does ``rule`` name the module at ``path`` itself (not through a parent)?"""
    if isinstance(rule, str):
        return path == rule or fnmatch.fnmatchcase(path, rule)
    if isinstance(rule, type):
        return isinstance(module, rule)
    return module is not None and module is rule


def match_depth(name: str, rule: Rule, modules: Modules) -> Optional[int]:
    """How many levels above the module at ``name`` ``rule`` names a module (0: the module itself), or None
    when it names neither the module nor anything above it."""
    for depth, path in enumerate(lineage(name)):
        if names_directly(path, modules.get(path), rule):
            return depth
    return None


def covers(name: str, rule: Rule, modules: Modules) -> bool:
    """Does ``rule`` name the module at ``name`` or a module above it?"""
    return match_depth(name, rule, modules) is not None


def ratio_for(name: str, ratios: Mapping[str, float], modules: Modules) -> Optional[float]:
    """The ratio ``ratios`` fixes for the layer at ``name`` (None: none does). A pattern naming the layer
    itself wins over one naming a module above it (``{"layer4": 0.9, "layer4.0.conv1": 0.0}`` spares
    that conv); between patterns naming the same level, the first in the dict wins."""
    best: Optional[Tuple[int, float]] = None
    for pattern, ratio in ratios.items():
        depth = match_depth(name, pattern, modules)
        if depth is not None and (best is None or depth < best[0]):
            best = (depth, ratio)
    return None if best is None else best[1]


# ---- every rule must name something ---------------------------------------------------------------------------
def check_rules_match(model: nn.Module, ignore: Sequence[Rule] = (), ratios: Optional[Mapping[str, Any]] = None
                      ) -> None:
    """Raise :class:`InvalidOptionError` for the first ``ignore`` entry or ``ratios`` pattern that names no
    module of ``model``, suggesting the module names (or classes) closest to what was written.

    Checked once against the whole model, before anything is traced: a rule that misses is a typo or was
    written for another model, and would otherwise leave the model pruned as if it had not been given."""
    modules = all_modules(model)
    for rule in ignore:
        if not _names_any(rule, modules):
            raise InvalidOptionError(f"ignore entry {_describe(rule)} {_why_nothing(rule, model, modules)}")
    for pattern in ratios or {}:
        if not _names_any(pattern, modules):
            raise InvalidOptionError(f"ratios pattern {pattern!r} {_why_nothing(pattern, model, modules)}")


def _names_any(rule: Rule, modules: Modules) -> bool:
    return any(names_directly(path, module, rule) for path, module in modules.items())


def _describe(rule: Rule) -> str:
    if isinstance(rule, str):
        return repr(rule)
    if isinstance(rule, type):
        return f"{rule.__qualname__} (a class)"
    return f"{type(rule).__name__} (a module instance)"


def _why_nothing(rule: Rule, model: nn.Module, modules: Modules) -> str:
    """The rest of the message for a rule that names nothing: what the model has instead, and what to pass."""
    kind = type(model).__name__
    if isinstance(rule, str):
        names = [path for path in modules if path]
        close = difflib.get_close_matches(rule, names, n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(map(repr, close))}?" if close
                else f"its top-level modules are {', '.join(repr(n) for n, _ in model.named_children()) or 'none'}.")
        return (f"matches no module of this {kind}; {hint} Names are the paths of model.named_modules() "
                f"(a parent such as 'layer4' covers every module in it; globs such as 'layer4.*' work too).")
    if isinstance(rule, type):
        classes = sorted({type(m).__name__ for m in modules.values()})
        close = difflib.get_close_matches(rule.__name__, classes, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        return (f"matches no module of this {kind}: it has no {rule.__name__}. {hint}Its module classes are "
                f"{', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''}.")
    return (f"is not a module of this {kind}. Pass a module of the model being pruned itself (model.<path>), "
            f"not one of another model or of a copy, or its path as a name.")


# ---- rules seen from inside a submodule -----------------------------------------------------------------------
def rules_inside(rules: Iterable[Rule], path: str, model: nn.Module) -> List[Tuple[Rule, List[str]]]:
    """For each rule written for the whole ``model``, the names, relative to the submodule at ``path``, of the
    submodule's modules it names directly (``""``: the submodule itself, also when the rule names a module
    above it). As exact-name patterns, these cover in the submodule what the rule covers in the model, and a
    rule naming nothing there yields no names (it names modules elsewhere, which is no error)."""
    modules = all_modules(model)
    part = modules[path]
    resolved = []
    for rule in rules:
        names = []
        for relative, module in part.named_modules(remove_duplicate=False):
            full = f"{path}.{relative}" if relative else path
            # the submodule itself stands for every module above it too: they are outside the part
            if covers(full, rule, modules) if not relative else names_directly(full, module, rule):
                names.append(exact_pattern(relative))
        resolved.append((rule, names))
    return resolved


def by_name(rules: Iterable[Rule], model: nn.Module) -> List[Rule]:
    """``rules`` with every module instance replaced by the exact names of its paths in ``model``: what a
    schedule needs, whose later steps prune copies, in which the caller's instances no longer appear."""
    paths: Dict[int, List[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(exact_pattern(path))
    named: List[Rule] = []
    for rule in rules:
        named.extend(paths.get(id(rule), [rule]) if isinstance(rule, nn.Module) else [rule])
    return named


def exact_pattern(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` (its ``*``, ``?`` and ``[`` taken literally)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


__all__ = ["Rule", "all_modules", "by_name", "check_rules_match", "covers", "exact_pattern", "lineage", "match_depth",
           "names_directly", "ratio_for", "rules_inside"]
