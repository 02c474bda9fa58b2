"""Pruning a model that cannot be captured whole: its largest traceable submodules, one at a time.

Detectors and other models with data-dependent control flow in ``forward`` (torchvision's Faster
R-CNN, RetinaNet, SSD) fail both torch.fx and torch.export. Their backbone, feature pyramid and heads
usually trace on their own. :func:`slim_submodules`

1. runs the whole model once on the example input, recording with forward pre-hooks what each
   submodule receives (its first call);
2. walks the module tree from the top and keeps every submodule that captures with its recorded
   input as one *part*, descending into the children of those that do not;
3. prunes each part with ``slim`` on its recorded input (its own verification included). A part's
   inputs and outputs keep their widths (``slim`` never prunes a graph's inputs or outputs), so the
   interfaces between parts, and with the untraceable code around them, stay intact;
4. runs the whole pruned model on the example input: it must run and return the same structure.

The caller's model is never changed: parts are pruned on a copy, and any failure raises before it
is returned.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import ExampleInputError, InvalidOptionError, StructPruneError, TraceError, VerificationError
from .graph.capture import Inputs, capture, eval_mode, output_tensors
from .graph.dependency_graph import preserved_state
from .ops import has_module_rule, traced_forward_for
from .options import check_ignore, check_ratios
from .planning.patterns import check_rules_match, rules_inside
from .surgery.copying import deep_copy_module
from .tools.metrics import count_parameters
from .verify import VerificationResult

# options that describe the whole model's data or schedule, which a part's recorded input cannot stand for
_WHOLE_MODEL_OPTIONS = ("data", "loss_fn", "reference_widths")


@dataclass
class PiecewiseReport:
    """What :func:`slim_submodules` did: one ``SlimReport`` per pruned part, and what it kept as is."""

    parts: Dict[str, Any]  # submodule path -> its SlimReport
    kept: Dict[str, str]  # submodule path -> why it was left as is (it holds parameters but no part does)
    params_before: int
    params_after: int
    trace_error: str  # why the whole model could not be captured
    notes: List[str] = field(default_factory=list)

    @property
    def verification(self) -> Optional[VerificationResult]:
        """Every part's verification together (None when no part was verified)."""
        results = [r.verification for r in self.parts.values() if r.verification is not None]
        if not results:
            return None
        failed = [path for path, r in self.parts.items() if r.verification is not None and not r.verification.passed]
        passed = not failed
        message = (f"verification passed for all {len(results)} pruned submodules, and the whole pruned model runs"
                   if passed else f"verification failed for {', '.join(failed)}")
        return VerificationResult(passed, all(r.exact for r in results), max(r.max_relative_error for r in results),
                                  message)

    @property
    def groups_pruned(self) -> int:
        return sum(r.groups_pruned for r in self.parts.values())

    @property
    def unknown_ops(self) -> Dict[str, int]:
        found: Dict[str, int] = {}
        for report in self.parts.values():
            for op, count in report.unknown_ops.items():
                found[op] = found.get(op, 0) + count
        return found

    def __str__(self) -> str:
        removed = 1 - self.params_after / max(self.params_before, 1)
        lines = [f"the whole model could not be captured, so its {len(self.parts)} largest traceable submodules "
                 f"were pruned one by one; parameters {self.params_before:,} -> {self.params_after:,} "
                 f"({removed:.1%} removed)"]
        for path, report in self.parts.items():
            part_removed = 1 - report.params_after / max(report.params_before, 1)
            lines.append(f"  {path}: {report.params_before:,} -> {report.params_after:,} ({part_removed:.1%} removed)")
        for path, why in self.kept.items():
            lines.append(f"  {path}: kept as is ({why})")
        lines.extend(self.notes)
        if self.verification is not None:
            lines.append(str(self.verification))
        return "\n".join(lines)


def slim_submodules(model: nn.Module, example_input: Any, ratio: float = 0.5, trace_error: str = "",
                    **options: Any) -> Tuple[nn.Module, PiecewiseReport]:
    """Prune the largest traceable submodules of ``model`` (see the module docstring); return a pruned copy
    and a :class:`PiecewiseReport`. ``options`` are ``slim``'s, applied to every part; ``ignore`` and
    ``ratios`` patterns name modules by their path in the whole model."""
    from .slim import slim_with_report  # slim falls back on this module: import at call time

    # once against the whole model: inside a part, an entry naming modules of other parts is no error
    check_rules_match(model, check_ignore(options.get("ignore", ())), check_ratios(options.get("ratios")))
    unsupported = [name for name in _WHOLE_MODEL_OPTIONS if options.get(name) is not None]
    if unsupported:
        raise InvalidOptionError(
            f"{', '.join(unsupported)} need the whole model's graph, and this model could not be captured whole "
            f"({_tracer_reasons(trace_error)}); prune its traceable submodules one by one with slim(model.part, ...) "
            f"and their own data, or make forward traceable")
    calls: Dict[str, int] = {}
    recorded = record_inputs(model, example_input, calls)
    parts, kept = find_parts(model, recorded, options.get("tracer", "auto"))
    if not parts:
        raise TraceError(f"the model could not be captured whole ({_tracer_reasons(trace_error)}), and no submodule "
                         f"with parameters could be captured on its own either: nothing can be pruned")
    pruned = deep_copy_module(model)
    reports: Dict[str, Any] = {}
    for path in parts:
        part_options = _part_options(options, path, model)
        small, report = slim_with_report(pruned.get_submodule(path), recorded[path], ratio, **part_options)
        _set_submodule(pruned, path, small)
        reports[path] = report
    if not any(report.groups_pruned for report in reports.values()):
        # every channel of every part is an input or output of the untraceable code: say why nothing was pruned
        raise TraceError(f"{trace_error.rstrip()}\nNo submodule could be pruned on its own either: the ones that "
                         f"capture ({', '.join(parts)}) have only channels that the untraceable code reads or "
                         f"feeds, which keep their widths.")
    check_whole_model_runs(model, pruned, example_input)
    notes = [f"{path} was called {calls[path]} times; it was pruned and verified on its first call"
             for path in parts if calls.get(path, 0) > 1]
    params_before = count_parameters(model)
    if options.get("inplace"):  # every check passed: swap the pruned parts into the caller's model in one step
        for path in parts:
            _set_submodule(model, path, pruned.get_submodule(path))
        pruned = model
    return pruned, PiecewiseReport(reports, kept, params_before, count_parameters(pruned),
                                   _tracer_reasons(trace_error), notes)


# ---- recording what each submodule receives -----------------------------------------------------------------
def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _detached(v)) for k, v in value.items()) if not hasattr(value, "_fields") else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_detached(v) for v in value)
    return value


def _run(model: nn.Module, example_input: Any) -> Any:
    inputs = Inputs.from_example(example_input).cloned()
    return model(*inputs.args, **inputs.kwargs)


def record_inputs(model: nn.Module, example_input: Any, calls: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Path -> the example input (for ``slim``) each submodule receives on its first call, recorded in one
    eval-mode forward of the whole model (buffers and the RNG restored afterwards). ``calls``, if given,
    receives how many times each submodule was called in that forward."""
    counts: Dict[str, int] = {} if calls is None else calls
    recorded: Dict[str, Any] = {}
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(module: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            counts[path] = counts.get(path, 0) + 1
            if path not in recorded:
                recorded[path] = _as_example(module, _detached(args), _detached(kwargs))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with eval_mode(model), preserved_state(model), torch.no_grad():
            _run(model, example_input)
    except StructPruneError:
        raise
    except Exception as error:
        raise ExampleInputError(f"the model cannot run on the example input ({type(error).__name__}: "
                                f"{_first_line(str(error))})") from error
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def _as_example(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The recorded call as one ``slim`` example input: positional arguments, or keywords when any were
    passed by name (positional ones then named after the forward's parameters)."""
    if not kwargs:
        return tuple(args)
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return tuple(args)
    return dict(bound.arguments)


# ---- choosing the parts ---------------------------------------------------------------------------------------
def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def find_parts(model: nn.Module, recorded: Dict[str, Any], tracer: str = "auto") -> Tuple[List[str], Dict[str, str]]:
    """The largest submodules that capture on their own with their recorded input (outermost first), and
    for every module with parameters that no part covers, why it was kept as is."""
    parts: List[str] = []
    kept: Dict[str, str] = {}

    def visit(path: str, module: nn.Module) -> None:
        if not _has_parameters(module):
            return
        if path not in recorded:
            kept[path] = "not called when the model runs on the example input"
            return
        try:
            capture(module, Inputs.from_example(recorded[path]), has_module_rule, tracer=tracer,
                    stand_in=traced_forward_for)
        except (TraceError, ExampleInputError) as error:
            children = [(f"{path}.{name}", child) for name, child in module.named_children() if _has_parameters(child)]
            if not children:
                kept[path] = f"cannot be captured: {_first_line(str(error))}"
            own = [name for name, _ in module.named_parameters(recurse=False)]
            if own:
                kept[path] = f"its own parameters {own} are used by code that cannot be captured"
            for child_path, child in children:
                visit(child_path, child)
            return
        parts.append(path)

    for name, child in model.named_children():
        visit(name, child)
    return parts, kept


def _part_options(options: Dict[str, Any], path: str, model: nn.Module) -> Dict[str, Any]:
    """``slim`` options for the part at ``path``. ``ignore`` and ``ratios`` entries are written for the whole
    model (and were checked against it): each becomes the exact names, relative to the part, of the part's
    modules it names (``""``, the part itself, when it names the part or a module above it), so it covers in
    the part what it covers in the model. Instances become names too (the part is pruned on a copy), and an
    entry naming only modules outside the part simply has no names there."""
    part = dict(options)
    if "ignore" in options:
        part["ignore"] = [name for _, names in rules_inside(check_ignore(options["ignore"]), path, model)
                          for name in names]
    if options.get("ratios"):
        ratios = check_ratios(options["ratios"])
        part["ratios"] = {}
        for ratio, (_, names) in zip(ratios.values(), rules_inside(ratios, path, model)):
            for name in names:  # between patterns naming the same module, the first still wins
                part["ratios"].setdefault(name, ratio)
    return part


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


# ---- the whole model after pruning ----------------------------------------------------------------------------
def _structure(value: Any) -> Any:
    """The container structure of an output (types and keys), without tensor values or sizes that depend on
    them (a detector's box count)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.ndim)
    if isinstance(value, dict):
        return (type(value).__name__, tuple((k, _structure(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_structure(v) for v in value))
    return type(value).__name__


def check_whole_model_runs(original: nn.Module, pruned: nn.Module, example_input: Any) -> None:
    """The pruned model must run on the example input and return what the original returns, structurally,
    with finite values; raises :class:`VerificationError` otherwise."""
    with torch.no_grad(), eval_mode(original), eval_mode(pruned), preserved_state(original):
        expected = _run(original, example_input)
        try:
            got = _run(pruned, example_input)
        except Exception as error:
            raise VerificationError(f"the pruned submodules do not fit together: the whole pruned model fails on the "
                                    f"example input ({type(error).__name__}: {_first_line(str(error))}). Your model "
                                    f"was left unchanged; please report this with the model definition") from error
    if _structure(got) != _structure(expected):
        raise VerificationError("the whole pruned model returns a different output structure than the original; "
                                "your model was left unchanged")
    bad = [i for i, t in enumerate(output_tensors(got)) if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise VerificationError(f"the whole pruned model returns non-finite values (output tensors {bad[:5]}); "
                                f"your model was left unchanged")


def _tracer_reasons(trace_error: str) -> str:
    """The tracers' own reasons from a ``TraceError`` message (its indented lines), on one line."""
    reasons = [line.strip() for line in str(trace_error).splitlines() if line.startswith("  ")]
    return "; ".join(reasons)[:600] if reasons else _first_line(trace_error)


def _first_line(text: Any) -> str:
    return str(text).strip().splitlines()[0][:300] if str(text).strip() else ""
