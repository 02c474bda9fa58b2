"""Latency as a target: widths planned on measured per-layer latency, landed by measuring the model.

``target={"latency": f}`` removes the fraction ``f`` of one forward's latency, on the model's own
device and dtype, at the example input's batch. Three steps, after HALP (Shen et al., NeurIPS'22):

1. **A latency table** (:class:`LatencyTable`): every weighted leaf module (conv, linear, attention)
   is timed alone at a few uniform widths (the probes), on its own inputs' pruned shapes. A leaf's
   latency is then a function of the fraction of its weights it keeps (its MAC fraction, for a conv
   or a linear), made monotone and interpolated. Timings are cached on disk per device, dtype and
   thread count, so a second run measures nothing.
2. **An allocation** (:func:`allocation`): starting from the full model, take, again and again, the
   step (one hardware-aligned block of one layer's least important units) that costs the least
   importance (scores weighted by the parameters the units carry) per second of predicted latency
   it saves. Channels go first where latency is bought
   cheaply: an early convolution at high resolution saves more time per parameter than a late one.
3. **Landing** (:func:`search_latency`): how many of those steps to take, found by timing real
   pruned candidates against the dense model (regula falsi on the predicted saving), until the
   measured latency is within :data:`LANDING` of the target.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import fx, nn

from ..errors import StructPruneError
from ..graph.attributes import attribute_at
from ..graph.dependency_graph import DependencyGraph
from ..graph.shapes import META_KEY, TensorMeta
from ..options import PlanOptions
from ..scoring import normalize
from ..surgery.copying import meta_twin
from ..surgery.shrink import shrunk_copy
from ..tools.progress import progress_bar
from ..tools.timing import paired_ratio, time_forward
from .hardware import model_device_dtype
from .planner import Plan, Planner
from .search import Increment, extend, layer_queues

PROBE_RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
LANDING = 0.015  # the search stops within 1.5% of the target latency, leaving room for the 5% it promises
PAIRS = 10  # alternating dense/pruned blocks per candidate, at least
PRECISION = 0.01  # ... and more, until the measured ratio is settled to 1% (see tools.timing.paired_ratio)
MAX_MEASUREMENTS = 8  # candidates timed while landing
CACHE_ENV = "STRUCTPRUNE_CACHE"  # folder of the on-disk latency cache (default ~/.cache/structprune)


# ---- the table ------------------------------------------------------------------------------------------------
@dataclass
class LeafLatency:
    """One weighted leaf module: its weight tensors (numel and channel spaces) and its measured latency
    as a function of the fraction of those weights kept."""

    name: str  # the graph node
    weights: List[Tuple[int, List[Any]]]  # (numel, spaces cutting the tensor)
    kept: List[float] = field(default_factory=list)  # fraction of the weights kept, per probe
    seconds: List[float] = field(default_factory=list)

    def kept_fraction(self, space_kept: Callable[[Any], float]) -> float:
        total = sum(numel for numel, _ in self.weights)
        left = sum(numel * math.prod(space_kept(s) for s in spaces) for numel, spaces in self.weights)
        return left / max(total, 1)

    def time(self, kept: float) -> float:
        """Interpolated seconds at ``kept``; monotone (a narrower layer never costs more than a wider one)."""
        order = np.argsort(self.kept)
        xs = np.asarray(self.kept)[order]
        # a narrower layer can always run as well as a wider one: the running minimum from the widest down
        ts = np.minimum.accumulate(np.asarray(self.seconds)[order][::-1])[::-1]
        return float(np.interp(kept, xs, ts))


class LatencyTable:
    """Per-leaf latency of ``dg.model`` on its device and dtype at the example input's shapes."""

    def __init__(self, dg: DependencyGraph, planner: Planner, options: PlanOptions, *,
                 probes: Sequence[float] = PROBE_RATIOS, cache: bool = True):
        self.dg = dg
        self.device, self.dtype = model_device_dtype(dg.model)
        self.leaves = _weighted_leaves(dg)
        self._cache = _DiskCache(self.device, self.dtype) if cache else None
        probe_options = dataclasses.replace(options, scope="local", target=None)  # probes: uniform widths
        meta_model = meta_twin(dg.model)
        bar = progress_bar(len(probes) * len(self.leaves), "latency table")
        try:
            for ratio in probes:
                plan = planner.plan(probe_options.with_ratio(ratio))
                dropped = plan.element_mask(dg)
                pruned = shrunk_copy(meta_model, dg, dropped)
                kept = _space_kept(dropped)
                for leaf, node in self.leaves.values():
                    seconds = self._time_leaf(pruned, node, dropped)
                    if seconds is not None:
                        leaf.kept.append(leaf.kept_fraction(kept))
                        leaf.seconds.append(seconds)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if self._cache is not None:
                self._cache.save()
        self.leaves = {name: (leaf, node) for name, (leaf, node) in self.leaves.items() if len(leaf.kept) >= 2}

    def predict(self, space_kept: Callable[[Any], float]) -> float:
        """Predicted seconds of the weighted leaves when each channel space keeps ``space_kept(space)``."""
        return sum(leaf.time(leaf.kept_fraction(space_kept)) for leaf, _ in self.leaves.values())

    def _time_leaf(self, pruned: nn.Module, node: fx.Node, dropped: np.ndarray) -> Optional[float]:
        """Seconds of one call of the node (a leaf module, or a function of parameters) in the pruned meta
        model ``pruned``, on random inputs of the pruned input shapes."""
        def describe(n: fx.Node) -> Any:
            if n.op == "get_attr":  # a parameter the function reads: its pruned shape
                return _Weight(tuple(attribute_at(pruned, str(n.target)).shape))
            return _pruned_input(self.dg, n, dropped)

        args = fx.node.map_arg(node.args, describe)
        kwargs = fx.node.map_arg(node.kwargs, describe)
        call: Any = pruned.get_submodule(str(node.target)) if node.op == "call_module" else node.target
        shapes = fx.node.map_aggregate((args, kwargs), lambda v: v.shape if isinstance(v, (TensorMeta, _Weight)) else v)
        key = _key(call, shapes)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        try:
            module = _materialised(call, self.device) if isinstance(call, nn.Module) else _Call(call)
            args, kwargs = fx.node.map_aggregate((args, kwargs), lambda v: self._tensor(v))
            seconds = time_forward(module, args, kwargs, repeats=3, min_time=0.01)
        except Exception:  # a leaf that cannot run alone is left out of the table: its latency stays unmodelled
            return None
        if self._cache is not None:
            self._cache[key] = seconds
        return seconds

    def _tensor(self, value: Any) -> Any:
        if isinstance(value, _Weight):
            return torch.randn(value.shape, device=self.device, dtype=self.dtype) * 0.02
        if not isinstance(value, TensorMeta):
            return value
        if value.dtype.is_floating_point:
            return torch.randn(value.shape, device=self.device, dtype=self.dtype)
        return torch.zeros(value.shape, device=self.device, dtype=value.dtype)


def _weighted_leaves(dg: DependencyGraph) -> Dict[str, Tuple[LeafLatency, fx.Node]]:
    """Every node that computes with weights (2-D or larger): a leaf module called as one node, or a
    function reading parameters (``F.linear(x, weight)`` in a graph that inlined its modules), with
    the channel spaces cutting those weights."""
    spaces_of: Dict[str, List[Any]] = {}
    for space in dg.spaces:
        spaces_of.setdefault(space.tensor, []).append(space)
    leaves: Dict[str, Tuple[LeafLatency, fx.Node]] = {}
    for node in dg.trace.graph.nodes:
        if node.op == "call_module":
            module = dg.trace.module.get_submodule(str(node.target))
            named = [(f"{node.target}.{name}", p) for name, p in module.named_parameters()]
        elif node.op == "call_function":
            reads = [n for n in node.all_input_nodes if n.op == "get_attr"]
            named = [(str(n.target), attribute_at(dg.trace.module, str(n.target))) for n in reads]
        else:
            continue
        weights = [(t.numel(), spaces_of.get(name, [])) for name, t in named
                   if isinstance(t, torch.Tensor) and t.dim() >= 2]
        if weights:
            leaves[node.name] = (LeafLatency(node.name, weights), node)
    return leaves


@dataclass(frozen=True)
class _Weight:
    """The shape of a parameter a timed function reads."""

    shape: Tuple[int, ...]


class _Call(nn.Module):
    """A function of tensors as a module, so that it can be timed like one."""

    def __init__(self, function: Callable[..., Any]):
        super().__init__()
        self.function = function

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


def _space_kept(dropped: np.ndarray) -> Callable[[Any], float]:
    return lambda space: 1.0 - float(space.of(dropped).mean()) if space.size else 1.0


def _pruned_input(dg: DependencyGraph, node: fx.Node, dropped: np.ndarray) -> Any:
    """The node's recorded output description with every labelled axis shrunk by the dropped elements."""
    meta = node.meta.get(META_KEY)
    label = dg.labels.get(node)
    if not isinstance(meta, TensorMeta) or not isinstance(label, tuple) or len(label) != meta.ndim:
        return meta
    shape = [size if elements is None else int(((elements < 0) | ~dropped[np.maximum(elements, 0)]).sum())
             for size, elements in zip(meta.shape, label)]
    return TensorMeta(tuple(shape), meta.dtype)


def _materialised(module: nn.Module, device: torch.device) -> nn.Module:
    """A real copy of a meta-device module, filled with small random values (garbage memory could hold
    denormals, which slow a CPU down)."""
    real = copy.deepcopy(module).to_empty(device=device)
    with torch.no_grad():
        for tensor in list(real.parameters()) + list(real.buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0, 0.02) if tensor.dim() >= 2 else tensor.fill_(1)
            else:
                tensor.zero_()
    return real.eval()


def _key(call: Any, shapes: Any) -> str:
    if isinstance(call, nn.Module):
        params = tuple((name, tuple(p.shape)) for name, p in call.named_parameters())
        return f"{type(call).__qualname__}|{call!r}|{params}|{shapes!r}"
    return f"{getattr(call, '__qualname__', None) or call!r}|{shapes!r}"


class _DiskCache(dict):
    """Leaf timings on disk, one JSON file per device, dtype, thread count and torch version."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"
        tag = hashlib.sha1(f"{name}|{dtype}|{torch.__version__}".encode()).hexdigest()[:16]
        folder = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "structprune")
        self.path = os.path.join(folder, f"latency-{tag}.json")
        try:
            with open(self.path) as f:
                self.update(json.load(f))
        except (OSError, ValueError):
            pass

    def save(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path + ".tmp", "w") as f:
                json.dump(dict(self), f)
            os.replace(self.path + ".tmp", self.path)
        except OSError:  # a read-only home: the table still works, it is just measured again next time
            pass


# ---- the allocation -------------------------------------------------------------------------------------------
def parameters_per_unit(dg: DependencyGraph) -> Dict[int, np.ndarray]:
    """Per group, the number of parameters each of its units indexes (a hidden channel of a transformer
    carries a row of every block's projections and of the embedding; an FFN channel three rows)."""
    numel = {name: p.numel() for name, p in dg.model.named_parameters()}
    carried = {group.id: np.zeros(group.n_units) for group in dg.groups}
    for group in dg.groups:
        for space, index in zip(group.spaces, group.unit_index):
            if space.tensor in numel and space.size:
                carried[group.id] += np.bincount(index, minlength=group.n_units) * (numel[space.tensor] / space.size)
    return carried


def fixed_plan(planner: Planner, options: PlanOptions) -> Plan:
    """What ``ratios=`` fixes, and nothing else: the layers it names at their ratios (every other layer at 0)."""
    return planner.plan(options.with_ratio(0.0)) if options.ratios else Plan()


def allocation(planner: Planner, options: PlanOptions, table: LatencyTable,
               start: Optional[Plan] = None) -> Tuple[List[Increment], np.ndarray]:
    """The order in which to remove steps beyond ``start`` (least importance lost per second of latency saved
    first), and the table's predicted seconds after each prefix of them (``predicted[k]``: after the first
    ``k``; ``predicted[0]``: ``start`` alone). Layers whose ratio ``ratios=`` fixes take no steps.

    A unit's importance is its normalised score (its standing within its group) times the parameters it
    carries: normalisation makes groups comparable per unit, and a unit that spans every block (a hidden
    channel) holds more of the model than one that spans a single layer. So the greedy spends importance
    where latency is cheap in parameters, which is what keeps the most of the model at a given latency."""
    dg = planner.dg
    unit_index = {space.id: index for group in dg.groups for space, index in zip(group.spaces, group.unit_index)}
    start = start if start is not None else Plan()
    dropped_units = {gid: np.zeros(dg.groups[gid].n_units, bool) for gid in planner.scores}
    for gid, units in start.drops.items():
        dropped_units[gid][units] = True

    def space_kept(space: Any) -> float:
        units = dropped_units.get(space.group)
        if units is None or space.id not in unit_index:
            return 1.0
        return 1.0 - float(units[unit_index[space.id]].mean())

    leaves_of: Dict[int, List[LeafLatency]] = {}
    for leaf, _ in table.leaves.values():
        for gid in {s.group for _, spaces in leaf.weights for s in spaces}:
            leaves_of.setdefault(gid, []).append(leaf)

    # the allocation ranks layers globally, so max_group_ratio always applies
    queues = layer_queues(planner, options, start, capped=True, skip_fixed=True)
    carried = parameters_per_unit(dg)
    normalized = {gid: normalize(s, options.normalize) for gid, s in planner.scores.items()}
    # standardised scores go negative: shift them all alike, so every unit is worth something and the order holds
    floor = min([0.0] + [float(s.min()) for s in normalized.values() if s.size])
    worth = {gid: (s - floor) * carried[gid] for gid, s in normalized.items()}
    taken = [0] * len(queues)
    moves: List[Increment] = []
    predicted = [table.predict(space_kept)]
    while True:
        best: Tuple[float, int, float] = (math.inf, -1, 0.0)
        for q, queue in enumerate(queues):
            if taken[q] + queue.step > queue.room:
                continue
            gid = queue.layer.group.id
            units = queue.remaining[taken[q]:taken[q] + queue.step]
            leaves = leaves_of.get(gid, [])
            before = sum(leaf.time(leaf.kept_fraction(space_kept)) for leaf in leaves)
            dropped_units[gid][units] = True
            after = sum(leaf.time(leaf.kept_fraction(space_kept)) for leaf in leaves)
            dropped_units[gid][units] = False
            saved = before - after
            if saved <= 0:
                continue
            price = float(worth[gid][units].sum()) / saved
            if price < best[0]:
                best = (price, q, saved)
        if best[1] < 0:
            return moves, np.asarray(predicted)
        queue = queues[best[1]]
        units = queue.remaining[taken[best[1]]:taken[best[1]] + queue.step]
        dropped_units[queue.layer.group.id][units] = True
        moves.append(Increment(queue.index, queue.layer.group.id, units, (best[0], taken[best[1]])))
        predicted.append(predicted[-1] - best[2])
        taken[best[1]] += queue.step


# ---- landing -------------------------------------------------------------------------------------------------
def _overshooting_step(seen: Dict[int, float], goal: float) -> Optional[int]:
    """The step between the last prefix slower than the goal and the next one faster, when they are adjacent."""
    fast = [k for k, ratio in seen.items() if ratio <= goal]
    if not fast:
        return None
    slow = [k for k, ratio in seen.items() if ratio > goal and k < min(fast)]
    return max(slow, default=0) if min(fast) - max(slow, default=0) == 1 else None


def _next_candidate(seen: Dict[int, float], saved: np.ndarray, goal: float) -> Optional[int]:
    """The next number of steps to try, from the measured ratios ``seen`` (steps -> pruned / dense).

    Between the closest measurements on either side of the goal: interpolate in predicted saving
    (regula falsi). Short of the goal on every measurement: scale the prediction by what the last
    one realised and extrapolate."""
    fast = [k for k, ratio in seen.items() if ratio <= goal]
    slow_end = max((k for k, ratio in seen.items() if ratio > goal and (not fast or k < min(fast))), default=0)
    if fast:
        fast_end = min(fast)
        if fast_end - slow_end <= 1:
            return None
        weight = (seen[slow_end] - goal) / max(seen[slow_end] - seen[fast_end], 1e-12)
        wanted = saved[slow_end] + weight * (saved[fast_end] - saved[slow_end])
        inside = np.arange(slow_end + 1, fast_end)
        return int(inside[np.argmin(np.abs(saved[inside] - wanted))])
    realised = (1 - seen[slow_end]) / max(saved[slow_end], 1e-12)  # measured removal per predicted removal
    wanted = (1 - goal) / max(realised, 1e-12)
    beyond = np.arange(slow_end + 1, len(saved))
    return int(beyond[np.argmin(np.abs(saved[beyond] - wanted))]) if beyond.size else None


def search_latency(planner: Planner, options: PlanOptions, target: float, *,
                   table: Optional[LatencyTable] = None, pairs: int = PAIRS) -> Tuple[Plan, float]:
    """The plan whose measured latency is ``1 - target`` of the dense model's (within :data:`LANDING`), and
    the fraction of the latency it removes.

    The table's prediction orders the steps and says roughly how many to take; measurements correct it.
    Each candidate is timed back to back with the dense model (:func:`~structprune.tools.timing.paired_ratio`:
    a shared machine drifts too much for anything else); the next candidate is interpolated in predicted
    saving between the closest measurements on either side of the goal (:func:`_next_candidate`), so a few
    measurements land it where a bisection would need a dozen."""
    dg = planner.dg
    table = table if table is not None else LatencyTable(dg, planner, options)
    start = fixed_plan(planner, options)  # the layers ratios= fixes: at their ratios, whatever the target
    moves, predicted = allocation(planner, options, table, start)
    goal = 1 - target
    inputs = dg.inputs.cloned()
    dense = max(table.predict(lambda space: 1.0), 1e-12)
    deltas = -np.diff(predicted) / dense  # predicted share of the leaves' time each step saves
    offset = 1 - predicted[0] / dense  # ... and the fixed layers' share

    def measure(k: int) -> float:
        pruned = shrunk_copy(dg.model, dg, extend(planner, options, start, moves[:k]).element_mask(dg))
        return paired_ratio(pruned, dg.model, inputs.args, inputs.kwargs, pairs=pairs, precision=PRECISION)

    seen: Dict[int, float] = {0: measure(0) if start.drops else 1.0}
    saved = offset + np.concatenate([[0.0], np.cumsum(deltas)])
    k = int(np.argmin(np.abs(1 - saved - goal)))  # first guess: the whole model as the table predicts
    for _ in range(MAX_MEASUREMENTS):
        seen[k] = measure(k)
        if abs(seen[k] - goal) <= LANDING * goal:
            # landed: time it once more (a second, independent pairing) before believing it
            seen[k] = (seen[k] + measure(k)) / 2
            if abs(seen[k] - goal) <= LANDING * goal:
                break
        next_k = _next_candidate(seen, saved, goal)
        if next_k is None:
            # one step jumps over the goal (a head of the residual stream in every block at once): leave that
            # layer as it is and carry on with the steps of the others, as the budget search does
            jump = _overshooting_step(seen, goal)
            if jump is None:
                break
            keep = [i for i, move in enumerate(moves) if i < jump or (i > jump and move.layer != moves[jump].layer)]
            moves, deltas = [moves[i] for i in keep], deltas[keep]
            saved = offset + np.concatenate([[0.0], np.cumsum(deltas)])
            seen = {j: ratio for j, ratio in seen.items() if j <= jump}
            next_k = _next_candidate(seen, saved, goal)
        if next_k is None or next_k in seen:
            break
        k = next_k
    k, measured = min(seen.items(), key=lambda item: abs(item[1] - goal))
    if abs(measured - goal) > 2.5 * LANDING * goal:
        fastest = measure(len(moves)) if moves else 1.0
        raise StructPruneError(
            f"cannot reach the latency target: removing {target:.1%} of the latency was asked, the closest plan "
            f"removes {1 - measured:.1%} (pruning everything prunable removes {1 - fastest:.1%}: the rest of the "
            f"time is in layers that cannot shrink, or in fixed overheads at this batch size)")
    return extend(planner, options, start, moves[:k]), 1 - measured
