"""Planning: which units every producing layer drops.

Scores are computed once per group; a plan is then a cheap function of the options, which is what
lets :func:`~structprune.planning.search.search_target` bisect on the ratio to hit a parameter or MAC budget.

- **local** scope: every layer (a producing space inside a group: a conv's filters, a linear's
  neurons) drops ``floor(ratio * n)`` of its ``n`` prunable units, lowest scores first;
- **global** scope: the units of all layers are ranked together (scores normalised per group) and
  the lowest ``ratio`` of them go, at most ``max_group_ratio`` of any one layer;
- ``ratios={"layer4.*": 0.7}`` fixes the ratio of matching layers (by module name); ``ignore``
  (names or globs, instances, or types) keeps the matching modules' own channels (a conv's
  filters, a norm's channels) while they still follow a narrower input. A name or instance of a
  parent (``"layer4"``, ``model.layer4``) covers every module inside it, and an entry that names no
  module raises (see :mod:`structprune.planning.patterns`); ``round_to=N`` keeps
  widths that are multiples of N. Every layer and every member tensor keeps at least one channel;
- ``hidden=False`` keeps every group whose channels a LayerNorm/RMSNorm (or another statistic over
  channels) normalises: in a transformer that is the residual stream (the hidden size), so only
  heads and feed-forward widths shrink;
- ``uniform_blocks`` (on by default for Hugging Face models) gives repeated blocks one width: the
  groups whose member tensors have the same paths but for the block numbers (``model.layers.3.mlp``
  and ``model.layers.7.mlp``) all drop the mean of what the plan gave them, each its own lowest units,
  because one config field (``intermediate_size``, ``num_attention_heads``) describes them all.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import StructPruneError
from ..graph.dependency_graph import DependencyGraph, Group
from ..ops.registry import input_axis
from ..options import PlanOptions
from ..scoring import Criterion, ScoringContext, normalize
from .config_limits import HeadCounts
from .hardware import alignment, model_device_dtype
from .patterns import all_modules, covers, ratio_for


@dataclass
class Plan:
    """Dropped unit indices per group id, and the resulting per-element drop mask."""

    drops: Dict[int, np.ndarray] = field(default_factory=dict)

    def element_mask(self, dg: DependencyGraph) -> np.ndarray:
        """Boolean per channel element: True where the element is removed."""
        dropped_root = np.zeros(dg.n_elements, bool)
        for gid, units in self.drops.items():
            # mark the units at their roots, then one gather through unit_root reaches every coupled element
            dropped_root[dg.groups[gid].unit_roots[units]] = True
        return dropped_root[dg.unit_root]

    @property
    def n_dropped(self) -> int:
        return int(sum(len(u) for u in self.drops.values()))


@dataclass
class _Layer:
    """The prunable units of one producing space inside a group."""

    group: Group
    name: str  # the producing module's path, used by `ratios`
    units: np.ndarray  # candidate unit indices (not frozen, not ignored)
    width: int  # all units the layer produces, frozen ones included
    channels_per_unit: int = 1  # a head is head_dim channels of its projection


class Planner:
    """Scores every prunable group once, then turns :class:`PlanOptions` into :class:`Plan` objects."""

    def __init__(self, dg: DependencyGraph, context: ScoringContext, criterion: Criterion,
                 ignore: Sequence[Any] = ()):
        self.dg = dg
        self.context = context
        # scored on first use: a group no plan can touch (the residual stream with hidden=False) is never read,
        # which on a large model spares reading its embeddings and every weight of the stream
        self.scores: Mapping[int, np.ndarray] = GroupScores(dg, criterion, context)
        self.modules = all_modules(dg.model)  # every path, so that a rule naming a parent covers its children
        self.layers = self._layers(ignore)
        self.device, self.dtype = model_device_dtype(dg.model)
        self.excluded: set = set()  # group ids kept whole whatever the options (see exclude)
        self._head_counts = HeadCounts(dg.model)

    def exclude(self, group_ids) -> None:
        """Keep these groups whole in every later plan (e.g. a dry run showed they cannot shrink)."""
        self.excluded.update(group_ids)

    def _layers(self, ignore: Sequence[Any]) -> List[_Layer]:
        ignore = list(ignore) if isinstance(ignore, (list, tuple, set)) else [ignore]
        layers = []
        for group in self.dg.prunable_groups:
            excluded = group.frozen_units.copy()
            for space, index in zip(group.spaces, group.unit_index):
                owner, _, attribute = space.tensor.rpartition(".")
                module = self.modules.get(owner)
                # an ignored layer (or one inside an ignored module) keeps its own channels but still follows a
                # narrower input
                if input_axis(module, attribute) != space.dim and any(
                        covers(owner, rule, self.modules) for rule in ignore):
                    excluded[index] = True
            # one layer per producing space: a concatenation's group holds several, and each loses its own share;
            # origin -1 gathers the units no layer produces into one nameless layer
            for origin in np.unique(group.unit_origin):
                in_layer = group.unit_origin == origin
                units = np.flatnonzero(in_layer & ~excluded)
                if units.size:
                    name = group.spaces[origin].tensor.rpartition(".")[0] if origin >= 0 else ""
                    # channels per unit: 1 for filters, head_dim when a head split tied a head's channels into one unit
                    per_unit = group.spaces[origin].size // max(len(np.unique(group.unit_index[origin])), 1) \
                        if origin >= 0 else 1
                    layers.append(_Layer(group, name, units, int(in_layer.sum()), max(per_unit, 1)))
        return layers

    def layers_in_play(self, options: PlanOptions) -> List[_Layer]:
        """The layers a plan with these options may shrink: not kept whole by a dry run, and with
        ``hidden=False`` not in a group some LayerNorm/RMSNorm normalises (the residual stream)."""
        return [layer for layer in self.layers
                if layer.group.id not in self.excluded and (options.hidden or layer.group.exact)]

    def candidates(self, options: PlanOptions) -> Dict[int, np.ndarray]:
        """Group id -> every unit a plan with these options may remove (not frozen, ignored or kept whole)."""
        found: Dict[int, List[np.ndarray]] = {}
        for layer in self.layers_in_play(options):
            found.setdefault(layer.group.id, []).append(layer.units)
        return {gid: np.unique(np.concatenate(parts)) for gid, parts in found.items()}

    def plan(self, options: PlanOptions) -> Plan:
        chosen: Dict[int, List[np.ndarray]] = {}
        pooled: List[Tuple[_Layer, np.ndarray]] = []
        ratios = options.ratios or {}  # PlanOptions turns None into {}
        for layer in self.layers_in_play(options):
            fixed = self.fixed_ratio(layer, ratios)
            if options.scope == "local" or fixed is not None:
                ratio = options.ratio if fixed is None else fixed
                reference = (options.reference_widths or {}).get(layer.name)
                # Pruner's schedule steps pass the original widths: a ratio then means a share of the original,
                # not of what earlier steps left, so the steps do not compound
                if reference:  # keep what the ratio leaves of the original width
                    n_drop = layer.width - (reference - math.floor(ratio * reference + 1e-9))
                    n_drop = min(max(n_drop, 0), len(layer.units), layer.width - 1)
                else:
                    # +1e-9: 0.29 * 100 is 28.999999999999996 in floating point; width - 1: every layer keeps a unit
                    n_drop = min(math.floor(ratio * len(layer.units) + 1e-9), layer.width - 1)
                drop = self._lowest(layer, n_drop)
                chosen.setdefault(layer.group.id, []).append(self._rounded(layer, drop, options))
            else:
                pooled.append((layer, normalize(self.scores[layer.group.id], options.normalize)))
        if pooled:
            for (layer, _), drop in zip(pooled, self._global(pooled, options)):
                chosen.setdefault(layer.group.id, []).append(self._rounded(layer, drop, options))
        return self.assemble(chosen, options)

    def fixed_ratio(self, layer: _Layer, ratios: Mapping[str, float]) -> Optional[float]:
        """The ratio ``ratios`` fixes for ``layer`` (a pattern naming it or a module it is in), or None.
        The nameless layer (units no layer produces) is matched only by patterns that match ``""``."""
        return ratio_for(layer.name, ratios, self.modules) if ratios else None

    def assemble(self, chosen: Dict[int, List[np.ndarray]], options: PlanOptions) -> Plan:
        """The plan dropping, per group id, the union of the given unit arrays (the same number in every
        repeated block with ``uniform_blocks``); every group keeps at least one unit and every member tensor
        at least one channel."""
        plan = Plan()
        if self.uniform_blocks(options):
            chosen = self._equalize_blocks(chosen, options)
        for gid, parts in chosen.items():
            group, scores = self.dg.groups[gid], self.scores[gid]
            drop = np.unique(np.concatenate(parts)).astype(np.int64)
            # layers with fixed ratios can together claim every unit of a group: keep its best one
            if len(drop) >= group.n_units:
                drop = drop[np.argsort(scores[drop], kind="stable")[:group.n_units - 1]]
            drop = _keep_every_space_alive(group, drop, scores)
            if drop.size:
                plan.drops[gid] = drop
        return plan

    def uniform_blocks(self, options: PlanOptions) -> bool:
        """Do repeated blocks keep one width? By default for Hugging Face models (they have ``save_pretrained``
        and a ``config``, which holds one width per kind of layer)."""
        if options.uniform_blocks is not None:
            return options.uniform_blocks
        model = self.dg.model
        return getattr(model, "config", None) is not None and callable(getattr(model, "save_pretrained", None))

    def repeated_blocks(self, options: PlanOptions) -> List[List[_Layer]]:
        """The layers in play that repeat across blocks, by kind: layers of single-layer groups whose member
        tensors have the same paths once block numbers are blanked out and the same number of units."""
        kinds: Dict[Tuple[Any, ...], List[_Layer]] = {}
        per_group: Dict[int, int] = {}
        in_play = self.layers_in_play(options)
        for layer in in_play:
            per_group[layer.group.id] = per_group.get(layer.group.id, 0) + 1
        for layer in in_play:
            if per_group[layer.group.id] == 1:
                paths = sorted({(_BLOCK_NUMBER.sub(".#.", f".{space.tensor}."), space.dim)
                                for space in layer.group.spaces})
                kinds.setdefault((tuple(paths), layer.group.n_units), []).append(layer)
        return [layers for layers in kinds.values() if len(layers) > 1]

    def _equalize_blocks(self, chosen: Dict[int, List[np.ndarray]], options: PlanOptions
                         ) -> Dict[int, List[np.ndarray]]:
        """Every repeated layer drops the same number of units: the mean of what ``chosen`` drops from them,
        to the nearest aligned step, each its own lowest-scoring units. A kind where some layer cannot drop
        that many (ignored or frozen units) is left as chosen."""
        chosen = dict(chosen)
        for layers in self.repeated_blocks(options):
            counts = [len(np.unique(np.concatenate(chosen[layer.group.id]))) if layer.group.id in chosen else 0
                      for layer in layers]
            step = max(self.step_of(layers[0], options), 1)
            n_drop = int(round(float(np.mean(counts)) / step)) * step
            n_drop = min(n_drop, layers[0].width - step)
            if n_drop == 0 and not any(counts):
                continue
            if any(len(layer.units) < n_drop for layer in layers):
                continue
            for layer in layers:
                chosen[layer.group.id] = [self._lowest(layer, n_drop)]
        return chosen

    def _lowest(self, layer: _Layer, n: int) -> np.ndarray:
        scores = self.scores[layer.group.id][layer.units]
        return layer.units[np.argsort(scores, kind="stable")[:max(n, 0)]]

    def _global(self, pooled: List[Tuple[_Layer, np.ndarray]], options: PlanOptions) -> List[np.ndarray]:
        """Rank every pooled unit by its group-normalised score; drop the lowest, within each layer's cap."""
        owners = np.concatenate([np.full(len(layer.units), k) for k, (layer, _) in enumerate(pooled)])
        units = np.concatenate([layer.units for layer, _ in pooled])
        scores = np.concatenate([normalized[layer.units] for layer, normalized in pooled])
        caps = np.array([min(math.floor(options.max_group_ratio * len(layer.units) + 1e-9), layer.width - 1)
                         for layer, _ in pooled])
        # ties (e.g. freshly initialised BN scales, all 1) are shared out in proportion to layer size
        # argsort of an argsort is each unit's rank inside its layer; over the layer size it is comparable across
        # layers and breaks ties between equal scores
        relative_rank = np.concatenate([np.argsort(np.argsort(normalized[layer.units], kind="stable"))
                                        / len(layer.units) for layer, normalized in pooled])
        quota = math.floor(options.ratio * len(units) + 1e-9)
        if options.reference_widths:  # a fraction of the original total, minus what earlier steps took
            original = sum(options.reference_widths.get(layer.name, layer.width) for layer, _ in pooled)
            already = original - sum(layer.width for layer, _ in pooled)
            quota = max(0, math.floor(options.ratio * original + 1e-9) - already)
        taken = np.zeros(len(pooled), np.int64)
        picked: List[int] = []
        # lexsort sorts by its last key first: lowest score, ties by relative rank; greedily, within each cap
        for i in np.lexsort((relative_rank, scores)):
            if len(picked) >= quota:
                break
            k = owners[i]
            if taken[k] < caps[k]:
                taken[k] += 1
                picked.append(i)
        picks = np.asarray(picked, dtype=np.int64)
        return [units[picks[owners[picks] == k]] for k in range(len(pooled))]

    def step_of(self, layer: _Layer, options: PlanOptions) -> int:
        """How many *units* the layer's width moves by: ``round_to`` channels (``"auto"``: the width the
        hardware runs well for the layer's original width, see :func:`~structprune.planning.hardware.alignment`),
        fewer units where one unit spans several channels (an attention head of 64 channels needs no rounding
        to 8). A multiple the model's config demands of the width comes on top (:meth:`config_multiple`)."""
        round_to = options.round_to
        demanded = self.config_multiple(layer)
        original = (options.reference_widths or {}).get(layer.name) or layer.width
        if not isinstance(round_to, str):
            channels = math.lcm(round_to or 1, demanded)
        else:
            channels = alignment(original * layer.channels_per_unit, self.device, self.dtype)
            # units spanning several channels (a grouped conv's channel in every group) need fewer units per step,
            # but never a step over an eighth of the layer: halve the alignment until it fits
            while channels > 1 and _units(math.lcm(channels, demanded), layer) > max(original // 8, 1):
                channels //= 2
            channels = math.lcm(channels, demanded)
        # a multiple a rule demands of the units themselves (an even head count) comes on top as well
        step = math.lcm(_units(channels, layer), layer.group.unit_multiple)
        if layer.width > step:
            return step
        # a layer narrower than its step may still lose units, unless a rule demands the multiple (then it stays whole)
        return layer.width if layer.group.unit_multiple > 1 else 1

    def config_multiple(self, layer: _Layer) -> int:
        """The multiple of channels a Hugging Face config demands of this layer's width: the residual stream
        (a normalised group as wide as ``config.hidden_size``) must stay a multiple of
        ``config.num_attention_heads``, which LLaMA's config validates on load (1: no demand)."""
        model = self.dg.model
        config = getattr(model, "config", None) if callable(getattr(model, "save_pretrained", None)) else None
        hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1 or layer.group.exact:
            return 1
        return heads if layer.width * layer.channels_per_unit == hidden else 1

    def _head_count_the_config_accepts(self, layer: _Layer, keep: int, options: PlanOptions) -> int:
        """``keep`` units, or the nearest count of query heads the model's config accepts (with ``hidden=False``,
        see :class:`~structprune.planning.config_limits.HeadCounts`)."""
        return keep if options.hidden else self._head_counts.nearest(layer.width, layer.channels_per_unit, keep)

    def _rounded(self, layer: _Layer, drop: np.ndarray, options: PlanOptions) -> np.ndarray:
        """Adjust ``drop`` so the layer keeps a multiple of ``round_to`` *channels* (nearest, at least one
        multiple)."""
        step = self.step_of(layer, options)
        keep = layer.width - len(drop)
        # nearest multiple of step, never zero: rounding may keep a little more or drop a little more
        target = keep if step == 1 else max(step, int(round(keep / step)) * step)
        target = self._head_count_the_config_accepts(layer, target, options)
        if target == keep:
            return drop
        n_drop = min(max(layer.width - target, 0), len(layer.units), layer.width - 1)
        return self._lowest(layer, n_drop) if n_drop != len(drop) else drop


def _units(channels: int, layer: _Layer) -> int:
    """Units of ``layer`` that make up a multiple of ``channels`` channels."""
    return channels // math.gcd(channels, layer.channels_per_unit)


_BLOCK_NUMBER = re.compile(r"\.\d+\.")  # a module path's block number: "layers.3." in "model.layers.3.mlp"


class GroupScores(Mapping):
    """Group id -> the criterion's scores of every prunable group, each computed when first read."""

    def __init__(self, dg: DependencyGraph, criterion: Criterion, context: ScoringContext):
        self._groups = {group.id: group for group in dg.prunable_groups}
        self._criterion, self._context = criterion, context
        self._scores: Dict[int, np.ndarray] = {}

    def __getitem__(self, gid: int) -> np.ndarray:
        if gid not in self._scores:
            group = self._groups[gid]
            self._scores[gid] = checked_scores(self._criterion, group, self._criterion(group, self._context))
        return self._scores[gid]

    def __iter__(self) -> Iterator[int]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)


def _keep_every_space_alive(group: Group, drop: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Un-drop the best unit of any member space that would otherwise lose every channel."""
    dropped = np.zeros(group.n_units, bool)
    dropped[drop] = True
    for index in group.unit_index:
        # a member tensor with every channel dropped would become empty (a concatenated layer that all scored
        # low): give back its best unit
        if dropped[index].all():
            present = np.unique(index)
            dropped[present[np.argmax(scores[present])]] = False
    return np.flatnonzero(dropped)


def checked_scores(criterion: Criterion, group: Group, raw: Any) -> np.ndarray:
    """A criterion's scores for ``group`` as float64, one per unit; raises :class:`StructPruneError` for the
    wrong count or a NaN, which ranks below and above everything at once and would silently decide what goes
    (infinities are fine: they order)."""
    scores = np.asarray(_as_numpy(raw), dtype=np.float64).reshape(-1)
    if scores.shape != (group.n_units,):
        raise StructPruneError(f"criterion {criterion.name!r} returned {scores.shape[0]} scores for group {group.id}, "
                               f"which has {group.n_units} units")
    nan = np.flatnonzero(np.isnan(scores))
    if nan.size:
        raise StructPruneError(
            f"criterion {criterion.name!r} returned NaN for {nan.size} of the {group.n_units} units of group "
            f"{group.id} ({group.spaces[0]}; units {nan[:8].tolist()}{' ...' if nan.size > 8 else ''}). Return "
            f"finite scores, higher meaning more important (a division by a zero norm is the usual cause: add a "
            f"small epsilon, or torch.nan_to_num the scores)")
    return scores


def _as_numpy(scores: Any) -> np.ndarray:
    if hasattr(scores, "detach"):
        return scores.detach().cpu().double().numpy()
    return np.asarray(scores)
