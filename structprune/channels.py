"""Pruning chosen channels: ``prune_channels``, and ``iter_groups`` to decide group by group.

``slim`` decides *which* channels go from scores; sometimes the caller already knows (an analysis
found dead filters, a paper's mask is being reproduced, a tool wants a human in the loop). Then:

>>> small, report = sp.prune_channels(model, x, {"layer1.0.conv2": [3, 7]})

removes output channels 3 and 7 of ``layer1.0.conv2`` *and everything coupled to them*: in a
ResNet the residual stream ties that conv to the stem, every block's last conv and BatchNorm and the
downsample branch, so channel 3 leaves all of them, and the input columns of every layer reading
them. The request is translated into the units of the dependency graph (a unit is one prunable
structure: a filter with every slice that follows it), so it means exactly what a plan means, and
it is applied like a plan: on a copy (or in place, restored on failure), verified against the
original with those channels zeroed.

A unit may span several channels: an attention head is ``head_dim`` channels of its projections,
and pruning whole heads (``attention="heads"``, the default) cannot remove one of them alone.
Naming one dim of a head removes the whole head; ``ChannelReport.expanded`` says so.

``iter_groups`` walks the plan that ``slim`` would apply, one group at a time, the way Torch-Pruning's
``pruner.step(interactive=True)`` does: each ``GroupProposal`` shows the group, its layers, the
scores and the proposed units; ``proposal.prune()`` accepts, ``proposal.prune(units)`` changes it, and
a group never pruned is kept. ``apply()`` prunes what was accepted, verified.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .errors import InvalidOptionError
from .graph.dependency_graph import DependencyGraph, Group, canonical_names
from .graph.labels import Space
from .ops.registry import input_axis, width_of
from .options import Options, require_prunable
from .pipeline import PruningSession
from .planning.dry_run import groups_that_break
from .planning.planner import Plan
from .tools.metrics import count_parameters
from .verify import VerificationResult

ChannelKey = Union[str, nn.Module, Tuple[str, int]]
"""A layer (a module or its path: its output channels), a parameter name (its dim 0), or ``(name, dim)``."""

# the options that mean something when the channels are chosen: how to trace, and how to apply
CHANNEL_OPTIONS = ("verify", "inplace", "compensate", "tracer", "attention")


# ---- the report ------------------------------------------------------------------------------------------------
@dataclass
class ChannelReport:
    """What ``prune_channels`` (or ``InteractivePruning.apply``) removed, in original indices.

    Attributes:
        requested: what was asked for, by the name the report uses for it (``"layer1.0.conv2"``,
            ``"fc.weight[dim 1]"``), sorted and without duplicates.
        removed: layer path -> its output channels removed: every layer whose width shrank, the ones
            coupled to a request included.
        tensors: ``(tensor name, dim)`` -> the indices removed from that axis: every parameter and buffer slice,
            input columns of the layers reading the channels included.
        expanded: request -> channels removed beyond those asked for, because a unit spans several channels
            (naming one dim of an attention head removes the whole head). Empty when exactly the request went.
        groups: group id -> the units removed from it.
        graph, plan: the dependency graph and the plan that was applied.
        params_before, params_after: parameter counts of the model and of the pruned model.
        verification: the verdict (None with ``verify=False``).
        notes: anything worth knowing (a head count the fused attention path wanted even, now odd).
    """

    requested: Dict[str, List[int]]
    removed: Dict[str, List[int]]
    tensors: Dict[Tuple[str, int], List[int]]
    expanded: Dict[str, List[int]]
    groups: Dict[int, List[int]]
    graph: DependencyGraph
    plan: Plan
    params_before: int
    params_after: int
    verification: Optional[VerificationResult]
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        share = 1 - self.params_after / max(self.params_before, 1)
        units = sum(len(u) for u in self.groups.values())
        lines = [f"removed {units} units from {len(self.groups)} channel groups; parameters "
                 f"{self.params_before:,} -> {self.params_after:,} ({share:.1%} removed)"]
        lines += [f"  {layer}: channels {_short(indices)} removed" for layer, indices in self.removed.items()]
        lines += [f"  {key}: a unit spans several channels (an attention head, or one head dim in every head), "
                  f"so {_short(extra)} went too" for key, extra in self.expanded.items()]
        lines += self.notes
        if self.verification is not None:
            lines.append(str(self.verification))
        return "\n".join(lines)


def _short(indices: Sequence[int], limit: int = 16) -> str:
    """A list of indices for a message, cut after ``limit``."""
    shown = ", ".join(map(str, indices[:limit]))
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


# ---- resolving what the caller named ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Target:
    """One request resolved: the name the report uses, and the channel space its indices count in."""

    key: str
    space: Space


class _Names:
    """Module paths, tensor names and channel spaces of one graph, for turning keys into spaces."""

    def __init__(self, dg: DependencyGraph):
        self.dg = dg
        self.modules: Dict[str, nn.Module] = dict(dg.model.named_modules(remove_duplicate=False))
        self.canonical = canonical_names(dg.tensors)  # id(tensor) -> the name its spaces use
        self.producers = dg.producer_mask()
        self._widths: Dict[str, Optional[Space]] = {}

    def resolve(self, key: Any) -> _Target:
        """The space a key names: a module's width space, a parameter's dim 0, or ``(name, dim)``'s axis."""
        if isinstance(key, nn.Module):
            path = self.path_of(key)
            return _Target(path, self.layer_space(path))
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str):
            dim = key[1]
            if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
                raise InvalidOptionError(f"{key!r}: the dim of a parameter must be an integer, e.g. ('fc.weight', 1)")
            return self.tensor_target(key[0], int(dim))
        if isinstance(key, str):
            if key in self.modules:
                return _Target(key, self.layer_space(key))
            if key in self.dg.tensors:
                return self.tensor_target(key, 0)
            raise InvalidOptionError(f"{key!r} names neither a module nor a parameter or buffer of the model"
                                     f"{_closest(key, list(self.modules) + list(self.dg.tensors))}")
        raise InvalidOptionError(f"prune_channels() takes modules, module paths ('layer1.0.conv2'), parameter names "
                                 f"('conv1.weight': its dim 0) or (name, dim) pairs ('fc.weight', 1) as keys; "
                                 f"got {key!r}")

    def path_of(self, module: nn.Module) -> str:
        """The first path of a module instance inside the model."""
        for path, candidate in self.modules.items():
            if candidate is module:
                return path
        raise InvalidOptionError(f"the module {type(module).__name__} passed as a key is not part of the model: "
                                 f"pass a module of this model (model.layer1[0].conv2) or its path")

    def tensor_target(self, name: str, dim: int) -> _Target:
        """The channel space of axis ``dim`` of a named parameter or buffer."""
        tensor = self.dg.tensors.get(name)
        if tensor is None:
            raise InvalidOptionError(f"{name!r} is not a parameter or buffer of the model"
                                     f"{_closest(name, list(self.dg.tensors))}")
        if not -tensor.ndim <= dim < tensor.ndim:
            raise InvalidOptionError(f"{name} has {tensor.ndim} dims (shape {tuple(tensor.shape)}); dim {dim} is "
                                     f"out of range")
        dim %= tensor.ndim
        space = self.dg.space_of(self.canonical[id(tensor)], dim)
        if space is None:
            raise InvalidOptionError(f"dim {dim} of {name} (size {tensor.shape[dim]}) is not a channel axis: no op "
                                     f"couples its positions to channels (a kernel dim, or a single channel). "
                                     f"Name a layer, or a parameter's output or input dim")
        key = name if dim == 0 else f"{name}[dim {dim}]"
        return _Target(key, space)

    def layer_space(self, path: str) -> Space:
        """The space of a layer's output channels (see ``width_space``); raises when it has none."""
        space = self.width_space(path)
        if space is None:
            module = self.modules[path]
            name = path or "the model"
            raise InvalidOptionError(
                f"{name} ({type(module).__name__}) has no output channels structprune can prune: it holds no "
                f"weight with a channel axis of its own (a container, an activation, or a single channel). Name one "
                f"of its layers, or a parameter with its dim: {{'{path + '.' if path else ''}<layer>.weight': ...}} "
                f"or {{('<name>.weight', 1): ...}}")
        return space

    def width_space(self, path: str) -> Optional[Space]:
        """The space of the layer's output channels, None if it has none: among its own parameters' and buffers'
        axes that are not its input axis (and as wide as its stated width: ``out_channels``, ``out_features``,
        ``num_features``, ``embedding_dim``), one that produces channels; else one of its children's that does
        (``nn.MultiheadAttention``'s ``out_proj``); else the first such axis (a LayerNorm's weight)."""
        if path not in self._widths:
            module = self.modules[path]
            width = width_of(module)
            own = list(self._axes(path, module, width, recurse=False))
            found = next((s for s in own if self.producers[s.start]), None)
            if found is None and width is not None:
                found = next((s for s in self._axes(path, module, width, recurse=True) if self.producers[s.start]),
                             None)
            self._widths[path] = found if found is not None else (own[0] if own else None)
        return self._widths[path]

    def _axes(self, path: str, module: nn.Module, width: Optional[int], recurse: bool) -> Iterator[Space]:
        """Channel spaces of the module's tensors that could be its output: not an input axis, ``width`` wide."""
        for name, tensor in chain(module.named_parameters(recurse=recurse), module.named_buffers(recurse=recurse)):
            owner, _, attribute = f"{path}.{name}".lstrip(".").rpartition(".")
            skip = input_axis(self.modules.get(owner), attribute)
            for dim, size in enumerate(tensor.shape):
                if dim != skip and (width is None or size == width):
                    space = self.dg.space_of(self.canonical.get(id(tensor), name), dim)
                    if space is not None:
                        yield space

    def layers_of(self, group: Group) -> Dict[str, Space]:
        """Layer path -> its output space, for every layer whose output channels are in ``group``."""
        layers: Dict[str, Space] = {}
        for space in group.spaces:
            owner = space.tensor.rpartition(".")[0]
            if owner in self.modules and owner not in layers and self.width_space(owner) is space:
                layers[owner] = space
        return layers


def _closest(name: str, names: Sequence[str]) -> str:
    """``; did you mean 'x'?`` for the closest name, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _checked_indices(key: str, raw: Any, size: int, noun: str = "channel") -> np.ndarray:
    """The indices of one request (channels, or a group's units), sorted and unique; raises for a non-integer or
    out-of-range one."""
    if isinstance(raw, torch.Tensor):
        raw = raw.tolist()
    if isinstance(raw, numbers.Integral) and not isinstance(raw, bool):
        raw = [raw]
    try:
        values = list(raw)
    except TypeError:
        raise InvalidOptionError(f"{key}: pass a list of {noun} indices, e.g. [3, 7]; got {raw!r}") from None
    wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if wrong:
        raise InvalidOptionError(f"{key}: {noun} indices must be integers, got {wrong[0]!r}")
    indices = np.unique(np.asarray(values, dtype=np.int64))
    outside = indices[(indices < 0) | (indices >= size)]
    if outside.size:
        raise InvalidOptionError(f"{key}: {noun} {int(outside[0])} is out of range: it has {size} {noun}s "
                                 f"(0 to {size - 1})")
    return indices


# ---- channels -> units -----------------------------------------------------------------------------------------
def _frozen_reason(dg: DependencyGraph, group: Group, unit: int) -> str:
    """Why ``unit`` of ``group`` must stay: the first freeze recorded on any of its elements."""
    if not group.prunable:
        return group.frozen_reason or "frozen"
    root = group.unit_roots[unit]
    # the freeze marks live in the graph's channel state only (a Group keeps a sample of reasons, not per unit);
    # this runs once, for the error message
    for elements, reason in dg.state.frozen:
        if (dg.unit_root[elements] == root).any():
            return reason
    return "frozen"


def _check_removable(dg: DependencyGraph, group: Group, units: np.ndarray, what: str,
                     channels: Optional[np.ndarray] = None) -> None:
    """Raise when a unit is frozen, saying why (``channels``: the caller's indices, parallel to ``units``)."""
    frozen = np.flatnonzero(group.frozen_units[units]) if group.prunable else np.arange(len(units))
    if frozen.size:
        first = int(frozen[0])
        which = f"channel {int(channels[first])}" if channels is not None else f"unit {int(units[first])}"
        scope = "its channels" if not group.prunable else which
        raise InvalidOptionError(f"{what}: {scope} cannot be removed: "
                                 f"{_frozen_reason(dg, group, int(units[first]))} (group {group.id}, "
                                 f"{group.spaces[0]})")


def _check_every_member_keeps_one(dg: DependencyGraph, drops: Mapping[int, np.ndarray]) -> None:
    """Raise when a member tensor would lose every channel: every layer keeps at least one."""
    for gid, units in drops.items():
        group = dg.groups[gid]
        for space, index in zip(group.spaces, group.unit_index):
            if np.isin(index, units).all():
                raise InvalidOptionError(
                    f"removing these channels would leave {space} with none of its {space.size}: every layer keeps "
                    f"at least one channel (group {gid}; a unit spanning several channels, such as an attention "
                    f"head, goes whole)")


def _requested_units(names: _Names, channels: Mapping[Any, Any]) -> Tuple[Dict[int, np.ndarray],
                                                                           Dict[str, Tuple[Space, np.ndarray]]]:
    """Group id -> the units the request drops (the union of every key's), and each key's space and indices."""
    if not isinstance(channels, Mapping):
        raise InvalidOptionError(f"channels must map layers or parameter names to channel indices, e.g. "
                                 f"{{'layer1.0.conv2': [3, 7]}}; got {type(channels).__name__}")
    dg = names.dg
    parts: Dict[int, List[np.ndarray]] = {}
    requested: Dict[str, Tuple[Space, np.ndarray]] = {}
    for key, raw in channels.items():
        target = names.resolve(key)
        indices = _checked_indices(target.key, raw, target.space.size)
        if target.key in requested:  # the same layer named twice (instance and path): one union
            indices = np.union1d(requested[target.key][1], indices)
        requested[target.key] = (target.space, indices)
        if not indices.size:
            continue
        group = _group_of(dg, target.space)
        units = group.unit_index[group.spaces.index(target.space)][indices]
        _check_removable(dg, group, units, target.key, indices)
        parts.setdefault(group.id, []).append(units)
    return {gid: np.unique(np.concatenate(p)) for gid, p in parts.items()}, requested


def _group_of(dg: DependencyGraph, space: Space) -> Group:
    """The group a channel space belongs to (every space has one once the graph is solved)."""
    assert space.group is not None, f"{space} was never solved into a group"
    return dg.groups[space.group]


# ---- applying --------------------------------------------------------------------------------------------------
def _positions(group: Group, space: Space, units: np.ndarray) -> List[int]:
    """The indices of ``space`` that belong to ``units``."""
    index = group.unit_index[group.spaces.index(space)]
    return np.flatnonzero(np.isin(index, units)).tolist()


def _check_forward_runs(session: PruningSession, drops: Mapping[int, np.ndarray]) -> None:
    """A dry run on the meta device (as ``slim`` does before shrinking): a width the graph does not show (a
    literal under torch.export) that depends on these channels makes the request fail with the reason."""
    dg = session.graph
    broken = groups_that_break(session.model, dg, dict(drops), lambda d: Plan(dict(d)).element_mask(dg))
    if broken:
        gid, error = next(iter(broken.items()))
        raise InvalidOptionError(f"removing these channels breaks the model's forward: group {gid} "
                                 f"({dg.groups[gid].spaces[0]}): {error}. A width the graph does not show (such as "
                                 f"C // num_heads under torch.export) depends on them; the model was left unchanged")


def _multiple_notes(dg: DependencyGraph, drops: Mapping[int, np.ndarray]) -> List[str]:
    """Notes for groups left with a unit count their rule wanted a multiple of (an even head count)."""
    notes = []
    for gid, units in drops.items():
        group = dg.groups[gid]
        kept = group.n_units - len(units)
        if group.unit_multiple > 1 and kept % group.unit_multiple:
            notes.append(f"group {gid} ({group.spaces[0]}) keeps {kept} units, not a multiple of "
                         f"{group.unit_multiple}: PyTorch's fused attention fast path (an even head count) is lost, "
                         f"the model runs its slower path")
    return notes


def apply_drops(session: PruningSession, drops: Mapping[int, np.ndarray],
                requested: Optional[Mapping[str, Tuple[Space, np.ndarray]]] = None) -> Tuple[nn.Module, ChannelReport]:
    """Prune exactly ``drops`` (group id -> units) with the session's options: checked (no frozen unit, every
    member keeps a channel, the forward still runs), then shrunk and verified by ``PruningSession.apply``.

    ``requested`` (report name -> (space, indices)) is what the caller asked for, to report expansions."""
    dg = session.graph
    unknown = [gid for gid in drops if not (isinstance(gid, numbers.Integral) and 0 <= gid < len(dg.groups))]
    if unknown:
        raise InvalidOptionError(f"{unknown[0]!r} is not a group id: the graph has groups 0 to {len(dg.groups) - 1}")
    drops = {gid: _checked_indices(f"group {gid}", units, dg.groups[gid].n_units, "unit")
             for gid, units in drops.items() if len(units)}
    for gid, units in drops.items():
        _check_removable(dg, dg.groups[gid], units, f"group {gid}")
    _check_every_member_keeps_one(dg, drops)
    if drops and (session.options.prune.verify or dg.trace.tracer == "export"):
        _check_forward_runs(session, drops)
    plan = Plan(dict(drops))
    params_before = count_parameters(session.model)
    pruned, verdict = session.apply(plan)
    return pruned, _report(session, plan, requested or {}, params_before, count_parameters(pruned), verdict)


def _report(session: PruningSession, plan: Plan, requested: Mapping[str, Tuple[Space, np.ndarray]],
            params_before: int, params_after: int, verdict: Optional[VerificationResult]) -> ChannelReport:
    """What went, in original indices: per layer, per tensor axis, and beyond the request."""
    dg, names = session.graph, _Names(session.graph)
    removed: Dict[str, List[int]] = {}
    tensors: Dict[Tuple[str, int], List[int]] = {}
    for gid, units in sorted(plan.drops.items()):
        group = dg.groups[gid]
        # a concatenation's group holds layers that lose nothing when only another layer's units go
        for space in group.spaces:
            positions = _positions(group, space, units)
            if positions:
                tensors[(space.tensor, space.dim)] = positions
        for layer, space in names.layers_of(group).items():
            if (space.tensor, space.dim) in tensors:
                removed[layer] = tensors[(space.tensor, space.dim)]
    expanded: Dict[str, List[int]] = {}
    for key, (space, indices) in requested.items():
        if key in names.modules and (space.tensor, space.dim) in tensors:  # a layer named whose space a child holds
            removed.setdefault(key, tensors[(space.tensor, space.dim)])
        extra = sorted(set(tensors.get((space.tensor, space.dim), [])) - set(indices.tolist()))
        if extra:
            expanded[key] = extra
    return ChannelReport({key: indices.tolist() for key, (_, indices) in requested.items()}, removed, tensors,
                         expanded, {gid: units.tolist() for gid, units in sorted(plan.drops.items())}, dg, plan,
                         params_before, params_after, verdict, _multiple_notes(dg, plan.drops) + list(dg.notes))


def prune_channels(model: nn.Module, example_input: Any, channels: Mapping[ChannelKey, Any], *,
                   verify: bool = True, inplace: bool = False, **options: Any) -> Tuple[nn.Module, ChannelReport]:
    """Remove exactly the named channels and everything coupled to them; return ``(pruned model, report)``.

    Args:
        model: any ``nn.Module`` ``slim`` takes.
        example_input: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        channels: what to remove, ``{key: channel indices}``. A key is a layer (the module or its path,
            ``"layer1.0.conv2"``): its output channels (a conv's filters, a linear's features, a BatchNorm's
            or an embedding's channels); a parameter or buffer name (``"conv1.weight"``): its dim 0; or
            ``(name, dim)`` (``("fc.weight", 1)``: the input columns of ``fc``). Indices count in that axis,
            in the original model.
        verify: check the pruned model against the original with the removed channels zeroed (raising
            ``VerificationError`` and leaving ``model`` untouched if they disagree).
        inplace: prune ``model`` itself instead of a copy (restored if anything fails).

    Keyword options: ``tracer`` and ``attention`` (how the graph is captured and what a head split prunes)
    and ``compensate`` (fold constant removed channels into biases), as in ``slim``.

    Every channel coupled to a named one goes with it: a residual stream's channel leaves every layer
    adding into that stream, and the input columns of every layer reading it. A unit spanning several
    channels goes whole: naming one dim of an attention head removes the head
    (``ChannelReport.expanded`` lists what went beyond the request).

    Raises:
        InvalidOptionError: an unknown module or parameter name, an index out of range, a channel that
            must stay (the message says why: it reaches a model output, an op without a rule reads it...),
            a layer that would lose every channel, a layer without output channels (a container), or a
            removal that breaks the forward. The model is left unchanged.

    Example:
        ```python
        small, report = sp.prune_channels(model, x, {"layer1.0.conv2": [3]})
        report.removed      # {"conv1": [3], "bn1": [3], "layer1.0.conv2": [3], ...}
        ```
    """
    require_prunable(model)
    settings = Options.parse({"verify": verify, "inplace": inplace, **options}, allowed=CHANNEL_OPTIONS,
                             caller="prune_channels")
    session = PruningSession(model, example_input, settings)
    drops, requested = _requested_units(_Names(session.graph), channels)
    return apply_drops(session, drops, requested)


# ---- interactive pruning ---------------------------------------------------------------------------------------
class GroupProposal:
    """One group of a plan, to accept, change or skip (see ``iter_groups``).

    Attributes:
        group: the ``Group`` (``.members``: every ``(tensor, dim)`` in it).
        layers: paths of the layers whose output channels are in the group.
        scores: one score per unit (higher: more important), the criterion's.
        proposal: the units the plan would remove, lowest scores first.
        chosen: the units that will be removed (None until ``prune``; a group never pruned is kept).

    Indices are *units* of the group, what the scores index: for plain convolutions and linear layers
    unit ``i`` is channel ``i`` of every member; a head or a concatenation differs, and
    ``channels`` shows which channels of each layer some units are.
    """

    def __init__(self, session: PruningSession, names: _Names, group: Group, scores: np.ndarray,
                 proposal: np.ndarray):
        self._session, self._names = session, names
        self.group = group
        self.layers: List[str] = list(names.layers_of(group))
        self.scores = scores
        self.proposal = np.asarray(proposal, np.int64)
        self.chosen: Optional[np.ndarray] = None

    @property
    def members(self) -> List[Tuple[str, int]]:
        """``(tensor name, dim)`` of every parameter and buffer slice in the group."""
        return self.group.members

    def prune(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """Remove the proposed units (``indices=None``) or these ones instead; returns what will go.

        Raises ``InvalidOptionError`` for an index out of range, a frozen unit, or a
        choice that would leave a member tensor without channels."""
        label = f"group {self.group.id}"
        units = self.proposal if indices is None else _checked_indices(label, indices, self.group.n_units, "unit")
        if units.size:
            _check_removable(self._session.graph, self.group, units, label)
            _check_every_member_keeps_one(self._session.graph, {self.group.id: units})
        self.chosen = units
        return units

    def skip(self) -> None:
        """Keep the whole group (also what happens to a group never pruned)."""
        self.chosen = None

    def channels(self, units: Optional[Sequence[int]] = None) -> Dict[str, List[int]]:
        """Layer path -> its output channels that ``units`` (default: the proposal) are."""
        chosen = self.proposal if units is None else np.asarray(units, np.int64)
        return {layer: _positions(self.group, space, chosen)
                for layer, space in self._names.layers_of(self.group).items()}

    def __str__(self) -> str:
        layers = ", ".join(self.layers[:6]) + (" ..." if len(self.layers) > 6 else "")
        proposal = sorted(self.proposal.tolist())
        return (f"group {self.group.id}: {self.group.n_units} units in {len(self.group.spaces)} tensors "
                f"(layers {layers or '-'}); the plan removes {len(proposal)}: {_short(proposal)}")

    __repr__ = __str__


class InteractivePruning:
    """Iterate over a plan's groups, decide each (``GroupProposal``), then ``apply``.

    Built by ``iter_groups``, or from a ``PruningSession`` whose options it uses
    (``plan``: the plan to walk, by default ``session.plan()``). ``every_group=True`` also yields the
    prunable groups the plan leaves whole, with an empty proposal.
    """

    def __init__(self, session: PruningSession, plan: Optional[Plan] = None, *, every_group: bool = False):
        self.session = session
        self.plan = plan if plan is not None else session.plan()
        planner, names = session.planner(), _Names(session.graph)
        groups = session.graph.prunable_groups if every_group else \
            [session.graph.groups[gid] for gid in sorted(self.plan.drops)]
        empty = np.empty(0, np.int64)
        self.proposals: List[GroupProposal] = [
            GroupProposal(session, names, g, planner.scores[g.id], self.plan.drops.get(g.id, empty)) for g in groups]

    def __iter__(self) -> Iterator[GroupProposal]:
        return iter(self.proposals)

    def __len__(self) -> int:
        return len(self.proposals)

    def chosen(self) -> Dict[int, np.ndarray]:
        """Group id -> the units accepted so far."""
        return {p.group.id: p.chosen for p in self.proposals if p.chosen is not None and p.chosen.size}

    def apply(self) -> Tuple[nn.Module, ChannelReport]:
        """Prune the accepted units (verified, like ``prune_channels``); return ``(model, report)``."""
        return apply_drops(self.session, self.chosen())


def iter_groups(model: nn.Module, example_input: Any, ratio: float = 0.5, *, every_group: bool = False,
                **options: Any) -> InteractivePruning:
    """Walk the plan ``slim`` would apply, group by group, and prune what you accept.

    Takes the arguments and options of ``slim``. Each item is a ``GroupProposal``: ``.group``,
    ``.layers``, ``.members``, ``.scores`` and ``.proposal`` (units to remove); ``.prune()`` accepts the
    proposal, ``.prune(units)`` removes those units instead, and a group never pruned (or ``.skip()``-ped)
    is kept whole. ``apply()`` then returns the pruned model and a ``ChannelReport``, verified.
    ``every_group=True`` also yields the groups the plan leaves whole.

    Example:
        ```python
        steps = sp.iter_groups(model, x, ratio=0.3)
        for proposal in steps:
            print(proposal)                       # group 2: 64 units ...; the plan removes 16: [...]
            if "layer4" in proposal.layers[0]:
                continue                          # keep this group
            proposal.prune()                      # or proposal.prune([0, 5, 9])
        small, report = steps.apply()
        ```
    """
    require_prunable(model)
    session = PruningSession(model, example_input, Options.parse({"ratio": ratio, **options}, caller="iter_groups"))
    return InteractivePruning(session, every_group=every_group)


__all__ = ["ChannelReport", "GroupProposal", "InteractivePruning", "apply_drops", "iter_groups", "prune_channels"]
