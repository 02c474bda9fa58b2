"""``slim()``: trace -> group -> score -> plan -> shrink -> verify, in one call."""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from .scoring.criteria import Criterion, ScoringContext, get_criterion
from .errors import InvalidModelError, InvalidRatioError, StructPruneError, VerificationError
from .graph.dependency_graph import DependencyGraph
from .tools.metrics import count_parameters
from .planning.planner import Plan, PlanOptions, Planner, search_target
from .planning.dry_run import groups_that_break
from .surgery.shrink import rollback, shrink, shrunk_copy
from .planning.budgets import TARGETS, removed_fraction
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
    widths: Dict[str, int] = field(default_factory=dict)  # producing layer -> prunable width before pruning

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


def slim_with_report(model: nn.Module, example_input: Any, ratio: Optional[float] = 0.5, *,
                     criterion: Union[str, Criterion] = "l2", scope: str = "local",
                     target: Optional[Dict[str, float]] = None, max_group_ratio: float = 1.0,
                     round_to: Optional[int] = None, ignore: Sequence[Any] = (),
                     ratios: Optional[Dict[str, float]] = None, data: Optional[Iterable] = None,
                     loss_fn: Optional[Callable] = None, reduction: str = "mean",
                     normalize: Optional[str] = "mean", seed: Optional[int] = None, verify: bool = True,
                     inplace: bool = False, tracer: str = "auto", attention: str = "heads",
                     hidden: bool = True, reference_widths: Optional[Dict[str, int]] = None
                     ) -> Tuple[nn.Module, SlimReport]:
    """Like :func:`slim`, also returning a :class:`SlimReport`.

    ``reference_widths`` (layer name -> width before any pruning, see :attr:`SlimReport.widths`) makes
    ``ratio`` count from those widths: what :class:`structprune.Pruner` uses between steps."""
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    budget = _check_target(target)
    ratio = _check_ratio(0.5 if budget else ratio)  # with a target the ratio is searched for
    options = PlanOptions(ratio, scope, max_group_ratio, round_to, ignore, dict(ratios or {}), normalize, hidden,
                          reference_widths)
    score = get_criterion(criterion)
    dg = DependencyGraph(model, example_input, tracer=tracer, attention=attention)
    _check_materialised(model, criterion, verify)
    context = ScoringContext(model, dg, data=data, loss_fn=loss_fn, reduction=reduction, seed=seed)
    planner = Planner(dg, context, score, ignore)

    def make_plan() -> Plan:
        if budget:
            kind, fraction = budget
            return search_target(planner, options, removed_fraction(kind, dg, model), fraction)[0]
        return planner.plan(options)

    plan = make_plan()
    # a dry run on the meta device, then re-plan around what breaks; always under torch.export, whose
    # literals may hide widths read from tensors
    for _ in range(3 if verify or dg.trace.tracer == "export" else 0):
        broken = groups_that_break(model, dg, plan.drops, lambda drops: Plan(dict(drops)).element_mask(dg))
        if not broken:
            break
        planner.exclude(broken)
        dg.notes.extend(f"group {gid} ({dg.groups[gid].spaces[0]}) was kept whole: pruning it breaks the forward "
                        f"({error}); a width the graph does not show (such as C // num_heads under torch.export) "
                        f"depends on it" for gid, error in broken.items())
        plan = make_plan()
    dropped = plan.element_mask(dg)
    params_before = count_parameters(model)
    exact_part = _verify_exact_part(dg, model, plan, dropped) if verify else None
    reference = zeroed_reference(dg, dropped) if verify else None
    with rollback(model) if inplace else contextlib.nullcontext():
        if inplace:
            shrink(model, dg, dropped, dg.notes)
        pruned = model if inplace else shrunk_copy(model, dg, dropped, dg.notes)
        result = _checked(dg, plan, pruned, dropped, reference, exact_part) if verify else None
    report = SlimReport(dg, plan, params_before, count_parameters(pruned), result,
                        {gid: (dg.groups[gid].n_units, dg.groups[gid].n_units - len(units))
                         for gid, units in plan.drops.items()},
                        {layer.name: layer.width for layer in planner.layers})
    return pruned, report


def slim(model: nn.Module, example_input: Any, ratio: Optional[float] = 0.5, *,
         criterion: Union[str, Criterion] = "l2", scope: str = "local", target: Optional[Dict[str, float]] = None,
         max_group_ratio: float = 1.0, round_to: Optional[int] = None, ignore: Sequence[Any] = (),
         ratios: Optional[Dict[str, float]] = None, data: Optional[Iterable] = None,
         loss_fn: Optional[Callable] = None, reduction: str = "mean", normalize: Optional[str] = "mean",
         seed: Optional[int] = None, verify: bool = True, inplace: bool = False, tracer: str = "auto",
         attention: str = "heads", hidden: bool = True) -> nn.Module:
    """Return a structurally pruned copy of ``model``.

    Args:
        model: any ``nn.Module``; it is traced with torch.fx (torch.export as a fallback).
        example_input: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        ratio: fraction of channels removed, in [0, 1): from every layer (``scope="local"``) or
            from the whole model, least important first (``scope="global"``). At least one channel
            of every layer is kept.

    Keyword options:
        criterion: ``"l2"`` (default), ``"l1"``, ``"magnitude"``, ``"gradient"``, ``"taylor"``,
            ``"fpgm"``, ``"bn_scale"``, ``"random"``, or a function ``(group, context) -> scores``.
        data, loss_fn: calibration batches and ``loss_fn(model, batch)`` for gradient criteria
            (default loss: cross-entropy on ``(inputs, targets)`` batches).
        reduction: combine member scores by ``"mean"`` (default), ``"sum"`` or ``"max"``.
        normalize: per-group score normalisation for global ranking (``"mean"``, ``"max"``,
            ``"sum"`` or None).
        scope: ``"local"`` (default) or ``"global"``; ``max_group_ratio`` caps what global scope
            takes from any one layer.
        target: ``{"params": f}`` or ``{"macs": f}``: remove that fraction instead of a channel
            ratio (reached within one percentage point).
        round_to: keep widths that are multiples of this number.
        ignore: modules kept whole: names or globs, instances, or classes.
        ratios: ``{"module.glob.*": ratio}`` overrides for matching layers.
        seed: seed of the ``random`` criterion.
        verify: check the pruned model against the original with the removed channels zeroed and
            raise :class:`VerificationError` (leaving ``model`` untouched) if they disagree.
        inplace: prune ``model`` itself instead of a deep copy (restored if anything fails).
        tracer: ``"auto"`` (torch.fx, then torch.export when fx fails), ``"fx"`` or ``"export"``.
        attention: where a projection is split into heads (found in the graph, no head count needed),
            prune whole ``"heads"`` (default; grouped-query attention drops a key/value head with its
            query heads) or the same ``"head_dims"`` in every head (the softmax scale is kept: head
            dims under an implicit ``1/sqrt(head_dim)`` scale stay whole).
        hidden: also prune widths that LayerNorm/RMSNorm normalise (a transformer's residual stream,
            embeddings and tied heads included). ``False`` prunes only heads and feed-forward widths.

    Returns:
        The pruned model: same classes, attribute names and ``state_dict`` keys, smaller tensors.
    """
    return slim_with_report(model, example_input, ratio, criterion=criterion, scope=scope, target=target,
                            max_group_ratio=max_group_ratio, round_to=round_to, ignore=ignore, ratios=ratios,
                            data=data, loss_fn=loss_fn, reduction=reduction, normalize=normalize, seed=seed,
                            verify=verify, inplace=inplace, tracer=tracer, attention=attention,
                            hidden=hidden)[0]


def _check_target(target: Optional[Dict[str, float]]) -> Optional[Tuple[str, float]]:
    if target is None:
        return None
    if not isinstance(target, dict) or len(target) != 1:
        raise ValueError(f"target must be a dict with one entry, {{'params': f}} or {{'macs': f}}, got {target!r}")
    (kind, fraction), = target.items()
    if kind not in TARGETS:
        raise ValueError(f"target must name one of {TARGETS}, not {kind!r}")
    return kind, _check_ratio(fraction)


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
    if verify or (isinstance(criterion, str) and criterion != "random"):
        raise StructPruneError(
            "the model's weights are on the meta device: magnitude criteria and verification need real "
            "values. Load the weights first, or plan with criterion='random' (or your own scores) and "
            "verify=False.")


def _explain_failure(dg: DependencyGraph, plan: Plan, result: VerificationResult) -> str:
    groups = ", ".join(f"{gid} ({dg.groups[gid].spaces[0]})" for gid in list(plan.drops)[:5])
    return (f"pruning broke the model: {result.message}. Groups pruned include {groups}. Your model was left "
            f"unchanged; please report this with the model definition (slim(..., verify=False) skips the check).")
