"""Solving the couplings: elements unified by rules form *units*; spaces sharing units form *groups*.

Fully vectorised: one union-find over elements, one over (few) spaces, one ``np.unique``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .labels import ChannelState, Mark, Space, connected_components


@dataclass
class Group:
    """Channel spaces that must drop the same units.

    ``unit_index[k]`` maps each position of ``spaces[k]`` to a unit (0..n_units-1). A unit is one
    prunable structure (a filter together with everything coupled to it).
    """

    id: int
    spaces: List[Space]
    unit_index: List[np.ndarray]
    n_units: int
    frozen_units: np.ndarray  # bool per unit
    frozen_reasons: List[str]
    unit_roots: np.ndarray  # element id representing each unit
    unit_origin: np.ndarray  # per unit: index (into spaces) of the layer output that produces it, -1 if none
    exact: bool  # every op touching these channels is per-channel: verification is exact
    has_producer: bool
    unit_multiple: int = 1  # the kept units must stay a multiple of this (an even head count for a fast path)

    @property
    def size(self) -> int:
        """Number of units (channels that are pruned together)."""
        return self.n_units

    def __len__(self) -> int:
        return self.n_units

    @property
    def prunable(self) -> bool:
        return self.has_producer and self.n_units >= 2 and not self.frozen_units.all()

    @property
    def frozen_reason(self) -> Optional[str]:
        if self.prunable:
            return None
        if self.frozen_units.all() and self.frozen_reasons:
            return self.frozen_reasons[0]
        if not self.has_producer:
            return "no convolution/linear output in this group (nothing originates these channels)"
        if self.n_units < 2:
            return "a single channel: at least one is always kept"
        return "frozen"

    @property
    def members(self) -> List[tuple]:
        """(tensor name, dim) of every parameter/buffer slice in the group."""
        return [(s.tensor, s.dim) for s in self.spaces]

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"frozen ({self.frozen_reason})"
        frozen = int(self.frozen_units.sum())
        head = f"Group {self.id}: {self.n_units} units, {state}"
        if self.prunable and frozen:
            head += f", {frozen} units frozen"
        lines = [head] + [f"  {s.tensor} dim {s.dim} ({s.size})" for s in self.spaces[:12]]
        if len(self.spaces) > 12:
            lines.append(f"  ... {len(self.spaces) - 12} more members")
        return "\n".join(lines)

    __repr__ = __str__


def solve(state: ChannelState) -> Tuple[np.ndarray, np.ndarray, List[Group]]:
    """Units = element classes under the unifications; groups = spaces linked by shared units.

    Fully vectorised: one union-find over elements, one over (few) spaces, one ``np.unique``.

    Returns the unit root of every element, which elements can be verified exactly (their group
    sees only per-channel ops), and the groups.
    """
    n, n_spaces = state.n_elements, len(state.spaces)
    a = np.concatenate([pair.a for pair in state.pairs]) if state.pairs else np.empty(0, np.int64)
    b = np.concatenate([pair.b for pair in state.pairs]) if state.pairs else np.empty(0, np.int64)
    unit_root = connected_components(n, a, b)
    sizes = np.array([sp.size for sp in state.spaces], dtype=np.int64)
    element_space = np.repeat(np.arange(n_spaces), sizes)  # spaces own consecutive element ranges
    # two spaces are in one group when an element of one shares a unit with an element of the other
    # (pairing each element's space with the space of its unit root links exactly the spaces that share a unit)
    space_group = connected_components(n_spaces, element_space, element_space[unit_root])
    element_group = space_group[element_space]

    frozen, reasons = _frozen_units(unit_root, state.frozen)
    # one approximate op (LayerNorm, softmax over channels) anywhere in a group makes the whole group inexact:
    # its kept channels see statistics that also read the dropped ones
    inexact_groups = set(np.unique(element_group[np.concatenate([e for e, _ in state.inexact])]).tolist()) \
        if state.inexact else set()
    # elements whose group only sees per-channel ops: their pruning can be checked value for value
    exact_elements = ~np.isin(element_group, np.fromiter(inexact_groups, np.int64, len(inexact_groups)))
    producer_elements = np.concatenate(state.producers) if state.producers else np.empty(0, np.int64)
    producer_groups = set(np.unique(element_group[producer_elements]).tolist())
    is_producer = np.zeros(n, bool)
    is_producer[producer_elements] = True

    multiples: Dict[int, int] = {}
    for elements, n in state.multiples:
        root_space = int(element_group[elements[0]])
        multiples[root_space] = math.lcm(multiples.get(root_space, 1), n)

    roots, order, sorted_groups, local = _number_units(unit_root, element_group)
    # units per group, indexed by the group's root space id (a space id, so n_spaces bins always suffice)
    counts = np.bincount(sorted_groups, minlength=n_spaces)

    by_group: Dict[int, List[Space]] = {}
    for space in state.spaces:
        by_group.setdefault(int(space_group[space.id]), []).append(space)
    groups: List[Group] = []
    # a group's first space is its root (the smallest id): group ids follow space order, stable across runs
    for gid, (root, spaces) in enumerate(by_group.items()):
        index = [local[sp.start:sp.start + sp.size] for sp in spaces]
        # the group's unit roots are one run of the group-sorted roots, in _number_units' order: units[i] is unit i
        lo = int(np.searchsorted(sorted_groups, root))
        units = roots[order[lo:lo + counts[root]]]
        unit_frozen = frozen[units]
        group_reasons = [reasons[u] for u in units[unit_frozen][:8].tolist() if u in reasons]
        origin = np.full(int(counts[root]), -1, np.int64)
        for k in range(len(spaces) - 1, -1, -1):  # the first producing space wins
            # producers are marked from the first index of a layer's output axis, so its first element tells
            if is_producer[spaces[k].start]:
                origin[index[k]] = k
        groups.append(Group(gid, spaces, index, int(counts[root]), unit_frozen, group_reasons, units,
                            origin, root not in inexact_groups, root in producer_groups, multiples.get(root, 1)))
        for sp in spaces:
            sp.group = gid
    return unit_root, exact_elements, groups


def _frozen_units(unit_root: np.ndarray, marks: List[Mark]) -> Tuple[np.ndarray, Dict[int, str]]:
    """Per element: is its unit frozen (meaningful at unit roots); and the first reason per root."""
    frozen = np.zeros(len(unit_root), bool)
    reasons: Dict[int, str] = {}
    for elements, why in marks:
        roots = unit_root[elements]
        # a freeze on any element freezes its whole unit: record it at the root, where the caller reads it
        frozen[roots] = True
        # reasons are only for display; a sample of 64 bounds the cost of huge marks (a frozen embedding table)
        for root in np.unique(roots[:64]).tolist():
            reasons.setdefault(root, why)
    return frozen, reasons


def _number_units(unit_root: np.ndarray, element_group: np.ndarray) -> Tuple[np.ndarray, ...]:
    """Number the units of every group 0..k-1: order the unit roots by group (a stable sort keeps them
    ascending). Returns the roots, their order, the sorted group ids and each element's unit number."""
    n = len(unit_root)
    roots = np.flatnonzero(unit_root == np.arange(n))
    # roots come out ascending from flatnonzero; a stable sort by group keeps them ascending inside each group
    order = np.argsort(element_group[roots], kind="stable")
    sorted_groups = element_group[roots][order]
    # searchsorted of a sorted array into itself gives, for every entry, where its group's run starts;
    # subtracting that from the entry's position numbers the units of each group 0..k-1
    first = np.searchsorted(sorted_groups, sorted_groups)
    local_of_root = np.empty(len(roots), np.int64)
    local_of_root[order] = np.arange(len(roots)) - first
    # position: root element -> its index in ``roots``, so every element can look up its unit's number
    position = np.empty(n, np.int64)
    position[roots] = np.arange(len(roots))
    return roots, order, sorted_groups, local_of_root[position[unit_root]]
