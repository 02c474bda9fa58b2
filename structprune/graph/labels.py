"""Channel labels: the vocabulary every op rule speaks.

Every parameter or buffer axis that carries features gets a *space*: a run of fresh integer
*elements*, one per index along that axis. A tensor flowing through the traced graph carries a
*label*: for each of its axes either ``None`` (batch, spatial, tokens: nothing prunable) or an
``int64`` array naming the element behind each index (``-1`` for an index that belongs to no
space). Op rules map labels from inputs to outputs and *unify* arrays that must keep the same
indices (a residual add, a convolution consuming a feature map). A union-find over the unified
pairs yields the coupled units (channels that are pruned together) and the groups.

Elements, not whole spaces, are unified, so concatenation, splitting, flatten->linear (one
channel expanding into a block of inputs) and grouped convolutions are all plain index maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import numpy as np

AxisLabel = Optional[np.ndarray]
TensorLabel = Tuple[AxisLabel, ...]
Label = Union[None, TensorLabel, list]  # list: a tuple/list/dict output, one Label per item

UNLABELED = -1


@dataclass
class Space:
    """The elements of one parameter/buffer axis (a "channel space")."""

    id: int
    start: int
    size: int
    tensor: str  # canonical fully-qualified name of the parameter or buffer
    dim: int
    group: Optional[int] = None  # id of the Group it ends up in (set when the graph is solved)

    @property
    def elements(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size, dtype=np.int64)

    def of(self, per_element: np.ndarray) -> np.ndarray:
        """This space's entries of an array indexed by element (a drop mask, a unit map)."""
        return per_element[self.start:self.start + self.size]

    def __str__(self) -> str:
        return f"{self.tensor}[dim {self.dim}]"


@dataclass
class ChannelState:
    """Accumulates spaces, unifications and freezes while rules walk the graph."""

    spaces: list = field(default_factory=list)
    n_elements: int = 0
    axis_spaces: dict = field(default_factory=dict)  # (tensor fqn, dim) -> Space
    pairs: list = field(default_factory=list)  # (a, b, op) arrays of equal length, both >= 0
    frozen: list = field(default_factory=list)  # (elements, reason)
    inexact: list = field(default_factory=list)  # (elements, reason)
    producers: list = field(default_factory=list)  # elements that originate a structure
    widths: list = field(default_factory=list)  # (module path, attribute, elements): widths no tensor records
    attribute_axes: dict = field(default_factory=dict)  # (module path, attribute) -> the axis it sizes
    head_splits: list = field(default_factory=list)  # attributes.HeadSplit: where projections split into heads
    attention: str = "heads"  # what a head split prunes: whole "heads" or the same "head_dims" in every head

    def param_axis(self, tensor: str, dim: int, size: int) -> np.ndarray:
        """Elements of axis ``dim`` of the named tensor, created on first use."""
        key = (tensor, dim)
        space = self.axis_spaces.get(key)
        if space is None:
            space = Space(len(self.spaces), self.n_elements, size, tensor, dim)
            self.spaces.append(space)
            self.axis_spaces[key] = space
            self.n_elements += size
        elif space.size != size:
            raise RuntimeError(f"{tensor} dim {dim} seen with sizes {space.size} and {size}")
        return space.elements

    def unify(self, a: AxisLabel, b: AxisLabel, op: str, size: Optional[int] = None) -> None:
        """Declare that index i of ``a`` and index i of ``b`` must be kept or dropped together."""
        if a is None and b is None:
            return
        n = size if size is not None else len(a if a is not None else b)
        a = np.full(n, UNLABELED, np.int64) if a is None else a
        b = np.full(n, UNLABELED, np.int64) if b is None else b
        if len(a) != len(b):
            raise RuntimeError(f"unify of lengths {len(a)} and {len(b)} at {op}")
        known_a, known_b = a >= 0, b >= 0
        both = known_a & known_b
        if both.any():
            self.pairs.append((a[both], b[both], op))
        lonely = np.concatenate([a[known_a & ~known_b], b[known_b & ~known_a]])
        if lonely.size:
            self.freeze(lonely, f"{op}: coupled to a tensor axis with no prunable channels")

    def freeze(self, elements: Union[AxisLabel, Sequence], reason: str) -> None:
        arr = _known(elements)
        if arr.size:
            self.frozen.append((arr, reason))

    def freeze_label(self, label: Label, reason: str) -> None:
        for axis in iter_axes(label):
            self.freeze(axis, reason)

    def mark_inexact(self, elements: AxisLabel, reason: str) -> None:
        arr = _known(elements)
        if arr.size:
            self.inexact.append((arr, reason))

    def mark_producer(self, elements: AxisLabel) -> None:
        arr = _known(elements)
        if arr.size:
            self.producers.append(arr)


def _known(elements) -> np.ndarray:
    if elements is None:
        return np.empty(0, np.int64)
    arr = np.asarray(elements, dtype=np.int64).ravel()
    return arr[arr >= 0]


def iter_axes(label: Label):
    """Yield every labelled axis array inside a (possibly nested) label."""
    if label is None:
        return
    if isinstance(label, list):
        for item in label:
            yield from iter_axes(item)
        return
    for axis in label:
        if axis is not None:
            yield axis


def has_labels(label: Label) -> bool:
    return any(True for _ in iter_axes(label))


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Representative of every element under the equivalence generated by pairs (a[i], b[i]).

    Vectorised hook-and-compress union-find: a handful of numpy passes even for 10^5 elements.
    """
    root = np.arange(n, dtype=np.int64)
    if a.size == 0:
        return root
    while True:
        ra, rb = root[a], root[b]
        differ = ra != rb
        if not differ.any():
            return root
        ra, rb = ra[differ], rb[differ]
        low = np.minimum(ra, rb)
        np.minimum.at(root, ra, low)
        np.minimum.at(root, rb, low)
        while True:
            nxt = root[root]
            if np.array_equal(nxt, root):
                break
            root = nxt
