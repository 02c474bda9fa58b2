"""``slim()``: trace -> group -> score -> plan -> shrink -> verify, in one call."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
from torch import nn

from .criteria import Criterion, get_criterion
from .errors import InvalidModelError, InvalidRatioError, StructPruneError, VerificationError
from .graph import DependencyGraph
from .metrics import count_parameters
from .plan import Plan, plan_uniform
from .shrink import rollback, shrink, shrunk_copy
from .verify import VerificationResult, is_exact, verify as verify_pruned, zeroed_reference


@dataclass
class SlimReport:
    """What ``slim`` did: the graph it built, what it dropped, sizes, and the verification verdict."""

    graph: DependencyGraph
    plan: Plan
    params_before: int
    params_after: int
    verification: Optional[VerificationResult]
    pruned_groups: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # id -> (units before, after)

    @property
    def groups_pruned(self) -> int:
        return len(self.pruned_groups)

    @property
    def unknown_ops(self) -> Dict[str, int]:
        return dict(self.graph.unknown_ops)

    def __str__(self) -> str:
        removed = 1 - self.params_after / max(self.params_before, 1)
        lines = [f"pruned {self.groups_pruned} of {len(self.graph.groups)} channel groups "
                 f"({len(self.graph.prunable_groups)} prunable); parameters {self.params_before:,} -> "
                 f"{self.params_after:,} ({removed:.1%} removed)"]
        if self.graph.unknown_ops:
            lines.append("ops without a rule (their channels were kept): "
                         + ", ".join(f"{k} x{v}" for k, v in self.graph.unknown_ops.items()))
        lines.extend(self.graph.notes)
        if self.verification is not None:
            lines.append(str(self.verification))
        return "\n".join(lines)


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(float(ratio)):
        raise InvalidRatioError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not 0 <= float(ratio) < 1:
        raise InvalidRatioError(f"ratio must be in [0, 1) (the fraction of channels removed from every group), "
                                f"got {ratio}; use e.g. 0.5 to remove half")
    return float(ratio)


def slim_with_report(model: nn.Module, example_input: Any, ratio: float = 0.5, *,
                     criterion: Union[str, Criterion] = "l2", verify: bool = True,
                     inplace: bool = False, tracer: str = "auto") -> Tuple[nn.Module, SlimReport]:
    """Like :func:`slim`, also returning a :class:`SlimReport`."""
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    ratio = _check_ratio(ratio)
    score = get_criterion(criterion)
    dg = DependencyGraph(model, example_input, tracer=tracer)
    _check_materialised(model, criterion, verify)
    plan = plan_uniform(dg, model, ratio, score)
    dropped = plan.element_mask(dg)
    params_before = count_parameters(model)
    exact_part = _verify_exact_part(dg, model, plan, dropped) if verify else None
    reference = zeroed_reference(dg, dropped) if verify else None
    result = None
    if inplace:
        target = model
        with rollback(target):
            shrink(target, dg, dropped)
            if verify:
                result = _checked(dg, plan, target, dropped, reference, exact_part)
    else:
        target = shrunk_copy(model, dg, dropped)
        if verify:
            result = _checked(dg, plan, target, dropped, reference, exact_part)
    report = SlimReport(dg, plan, params_before, count_parameters(target), result,
                        {gid: (dg.groups[gid].n_units, dg.groups[gid].n_units - len(units))
                         for gid, units in plan.drops.items()})
    return target, report


def slim(model: nn.Module, example_input: Any, ratio: float = 0.5, *,
         criterion: Union[str, Criterion] = "l2", verify: bool = True, inplace: bool = False,
         tracer: str = "auto") -> nn.Module:
    """Return a structurally pruned copy of ``model``.

    Args:
        model: any ``nn.Module``; it is traced with torch.fx (torch.export as a fallback).
        example_input: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        ratio: fraction of channels removed from every prunable group, in [0, 1); at least one
            channel of every group is kept.
        criterion: importance criterion name (``"l2"``, ``"l1"``, ``"random"``) or a function
            ``(group, model) -> scores``.
        verify: check the pruned model against the original with the removed channels zeroed and
            raise :class:`VerificationError` (leaving ``model`` untouched) if they disagree.
        inplace: prune ``model`` itself instead of a deep copy (restored if anything fails).
        tracer: ``"auto"`` (torch.fx, then torch.export when fx fails), ``"fx"`` or ``"export"``.

    Returns:
        The pruned model: same classes, attribute names and ``state_dict`` keys, smaller tensors.
    """
    return slim_with_report(model, example_input, ratio, criterion=criterion, verify=verify, inplace=inplace,
                            tracer=tracer)[0]


def _verify_exact_part(dg: DependencyGraph, model: nn.Module, plan: Plan,
                       dropped: np.ndarray) -> Optional[VerificationResult]:
    """When some pruned channels meet channel-mixing ops (LayerNorm, softmax), the full result can
    only be checked for shapes and finiteness. Prune the other channels alone on a copy and check
    those value for value, so a mistake outside the mixing ops cannot hide behind them."""
    if is_exact(dg, dropped):
        return None
    subset = dropped & dg.exact_elements
    if not subset.any():
        return None
    result = verify_pruned(dg, shrunk_copy(model, dg, subset), subset, zeroed_reference(dg, subset), exact=True)
    if not result.passed:
        raise VerificationError(_explain_failure(dg, plan, result))
    return result


def _checked(dg: DependencyGraph, plan: Plan, pruned: nn.Module, dropped: np.ndarray, reference: Any,
             exact_part: Optional[VerificationResult]) -> VerificationResult:
    result = verify_pruned(dg, pruned, dropped, reference)
    if not result.passed:
        raise VerificationError(_explain_failure(dg, plan, result))
    if exact_part is not None:
        result.message += (f"; the channels outside channel-mixing ops, pruned alone, match the zeroed "
                           f"original exactly (relative error {exact_part.max_abs_error:.2g})")
    return result


def _check_materialised(model: nn.Module, criterion: Any, verify: bool) -> None:
    """Weights on the meta device can be planned but neither scored by magnitude nor run."""
    if not any(t.is_meta for t in model.parameters()):
        return
    if verify or criterion in ("l1", "l2"):
        raise StructPruneError(
            "the model's weights are on the meta device: magnitude criteria and verification need real "
            "values. Load the weights first, or plan with criterion='random' (or your own scores) and "
            "verify=False.")


def _explain_failure(dg: DependencyGraph, plan: Plan, result: VerificationResult) -> str:
    groups = ", ".join(f"{gid} ({dg.groups[gid].spaces[0]})" for gid in list(plan.drops)[:5])
    return (f"pruning broke the model: {result.message}. Groups pruned include {groups}. Your model was left "
            f"unchanged; please report this with the model definition (slim(..., verify=False) skips the check).")
