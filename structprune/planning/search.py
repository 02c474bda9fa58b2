"""Reaching a budget: the plan that removes a given fraction of the parameters or MACs.

Two stages. A bisection on the ratio finds the uniform plan closest to the target; rounding and
heads make the fraction a staircase in the ratio (one more head in every block of a ViT is 2.8% of
its parameters at once), so the closest uniform plan can miss by points. The second stage then
leaves one ratio behind: from the uniform plan just short of the target it removes further
*increments* (one hardware-aligned step of one layer's lowest-scoring units) in the order the
scope implies, bisecting on how many, until the target is met.

- local scope takes the increments round-robin by the share each layer has lost, so widths stay
  as even as the target allows;
- global scope takes them by normalised score, least important first, within ``max_group_ratio``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from ..errors import StructPruneError
from ..options import PlanOptions
from ..scoring import normalize
from .planner import Plan, Planner

TOLERANCE = 0.005  # what the search aims for
ACCEPTED = 0.01  # what it promises: one percentage point
MAX_SKIPS = 16  # layers whose next step overshoots, set aside one by one while refining


@dataclass(frozen=True)
class Increment:
    """One step of one layer: ``units`` of group ``group_id`` removed together; ``order`` sorts the steps."""

    layer: int  # index into the planner's layers
    group_id: int
    units: np.ndarray
    order: Tuple[float, int]


@dataclass(frozen=True)
class LayerQueue:
    """One layer's units still removable beyond a starting plan, lowest score first, taken ``step`` at a
    time; at most ``room`` more may go (the layer keeps one aligned step, and ``max_group_ratio`` where
    it applies)."""

    index: int  # into the planner's layers
    layer: Any
    remaining: np.ndarray
    step: int
    room: int


def layer_queues(planner: Planner, options: PlanOptions, start: Plan, *, capped: bool,
                 skip_fixed: bool) -> List[LayerQueue]:
    """A :class:`LayerQueue` for every layer in play; ``capped`` applies ``max_group_ratio``, ``skip_fixed``
    leaves out the layers whose ratio ``ratios=`` fixes."""
    fixed = (options.ratios or {}) if skip_fixed else {}
    in_play = {id(layer) for layer in planner.layers_in_play(options)}
    queues = []
    for index, layer in enumerate(planner.layers):
        if id(layer) not in in_play or planner.fixed_ratio(layer, fixed) is not None:
            continue
        already = np.isin(layer.units, start.drops.get(layer.group.id, np.empty(0, np.int64)))
        remaining = layer.units[~already]
        remaining = remaining[np.argsort(planner.scores[layer.group.id][remaining], kind="stable")]
        step = planner.step_of(layer, options)
        cap = layer.width - max(step, 1)
        if capped:
            cap = min(cap, math.floor(options.max_group_ratio * len(layer.units) + 1e-9))
        queues.append(LayerQueue(index, layer, remaining, step, cap - int(already.sum())))
    return queues


def increments(planner: Planner, options: PlanOptions, start: Plan) -> List[Increment]:
    """Every step the layers in play can still take beyond ``start``, in the order ``options.scope`` takes
    them. Layers with a fixed ratio (``ratios=``) keep theirs; every layer keeps at least one step."""
    steps: List[Increment] = []
    for queue in layer_queues(planner, options, start, capped=options.scope == "global", skip_fixed=True):
        layer, step = queue.layer, queue.step
        normalized = normalize(planner.scores[layer.group.id], options.normalize)
        dropped = len(layer.units) - len(queue.remaining)  # in the starting plan already
        for k in range(0, len(queue.remaining), step):
            units = queue.remaining[k:k + step]
            if len(units) < step or k + len(units) > queue.room:
                break
            key = (dropped + k + len(units)) / layer.width if options.scope == "local" \
                else float(normalized[units].mean())
            steps.append(Increment(queue.index, layer.group.id, units, (key, k)))
    return sorted(steps, key=lambda inc: inc.order)


def extend(planner: Planner, options: PlanOptions, start: Plan, steps: Sequence[Increment]) -> Plan:
    """``start`` with the given steps removed as well."""
    chosen: Dict[int, List[np.ndarray]] = {gid: [units] for gid, units in start.drops.items()}
    for inc in steps:
        chosen.setdefault(inc.group_id, []).append(inc.units)
    return planner.assemble(chosen, options)


def search_target(planner: Planner, options: PlanOptions, removed_fraction: Callable[[Plan], float],
                  target: float, steps: int = 24) -> Tuple[Plan, float]:
    """The plan whose ``removed_fraction`` is closest to ``target`` (within :data:`ACCEPTED`), and that
    fraction; raises :class:`StructPruneError` when no plan gets that close.

    Repeated blocks keep one width by default on Hugging Face models (``uniform_blocks``); where those
    coarser steps cannot land within :data:`ACCEPTED` (a small model with few blocks), the search lets
    blocks differ and says so in the graph's notes, unless ``uniform_blocks=True`` was asked for."""
    try:
        return _search(planner, options, removed_fraction, target, steps)
    except StructPruneError:
        if options.uniform_blocks is not None or not planner.uniform_blocks(options):
            raise
    plan, achieved = _search(planner, dataclasses.replace(options, uniform_blocks=False), removed_fraction,
                             target, steps)
    planner.dg.notes.append(f"repeated blocks were given different widths: with one width per kind of block the "
                            f"closest plan misses the target of {target:.1%} by more than {ACCEPTED:.0%}")
    return plan, achieved


def _search(planner: Planner, options: PlanOptions, removed_fraction: Callable[[Plan], float],
            target: float, steps: int) -> Tuple[Plan, float]:
    low, high = 0.0, 1.0
    best: Tuple[float, Plan, float] = (math.inf, Plan(), 0.0)
    short: Tuple[float, Plan] = (0.0, Plan())  # the plan removing most while still short of the target
    for _ in range(steps):
        ratio = (low + high) / 2
        plan = planner.plan(options.with_ratio(ratio))
        achieved = removed_fraction(plan)
        # rounding and per-layer caps make the fraction only roughly monotone in the ratio: keep the closest seen
        if abs(achieved - target) < best[0]:
            best = (abs(achieved - target), plan, achieved)
        if achieved < target and achieved >= short[0]:
            short = (achieved, plan)
        if abs(achieved - target) <= TOLERANCE:
            return plan, achieved
        low, high = (ratio, high) if achieved < target else (low, ratio)
    best = _refine(planner, options, removed_fraction, target, short[1], best)
    if best[0] > ACCEPTED:
        most = removed_fraction(planner.plan(options.with_ratio(1.0)))
        raise StructPruneError(f"cannot reach the target: removing {target:.1%} was asked, the closest plan "
                               f"removes {best[2]:.1%} (at most {most:.1%} is removable with these settings)")
    return best[1], best[2]


def _refine(planner: Planner, options: PlanOptions, removed_fraction: Callable[[Plan], float], target: float,
            start: Plan, best: Tuple[float, Plan, float]) -> Tuple[float, Plan, float]:
    """Take further increments beyond ``start`` while the target is not passed: bisect on how many, and
    when the next one would overshoot (one head of the residual stream can be points at once), keep
    what came before, leave that layer as it is and go on with the other layers' steps."""
    order = increments(planner, options, start)
    for _ in range(MAX_SKIPS):
        low, high = 0, len(order)  # the first ``low`` steps stay short of the target
        while low < high:
            middle = (low + high + 1) // 2
            plan = extend(planner, options, start, order[:middle])
            achieved = removed_fraction(plan)
            if abs(achieved - target) < best[0]:
                best = (abs(achieved - target), plan, achieved)
            if abs(achieved - target) <= TOLERANCE:
                return best
            low, high = (middle, high) if achieved < target else (low, middle - 1)
        if low >= len(order):
            break
        start, overshooting = extend(planner, options, start, order[:low]), order[low].layer
        order = [inc for inc in order[low + 1:] if inc.layer != overshooting]
    return best
