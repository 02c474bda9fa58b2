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
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

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


class Coupling(NamedTuple):
    """Index i of ``a`` and index i of ``b`` are kept or dropped together (both all >= 0), because of ``op``."""

    a: np.ndarray
    b: np.ndarray
    op: str


class Mark(NamedTuple):
    """Elements with a reason: frozen ones, or ones whose pruning only approximates the zeroed model."""

    elements: np.ndarray
    reason: str


class WidthRecord(NamedTuple):
    """``<path>.<attribute>`` states a width that no tensor records (BatchNorm without affine
    parameters, Swin's ``num_heads``): after pruning it becomes the count of kept ``elements``."""

    path: str
    attribute: str
    elements: np.ndarray


@dataclass
class HeadSplit:
    """A projection split into heads inside the forward of module ``path``.

    ``heads``/``dims`` are the element labels of the head and head-dim axes when that axis is the one
    pruning shortens (an int: its size never changes)."""

    path: str
    heads: Union[np.ndarray, int]
    dims: Union[np.ndarray, int]


class Checkpoint(NamedTuple):
    """Lengths of every record list of a :class:`ChannelState` at one moment (see ``rollback``)."""

    spaces: int
    n_elements: int
    pairs: int
    frozen: int
    inexact: int
    producers: int
    widths: int
    head_splits: int
    attribute_axes: int
    multiples: int


@dataclass
class ChannelState:
    """Accumulates spaces, unifications and freezes while rules walk the graph.

    Graph facts (spaces, pairs, frozen, inexact, producers) say what is coupled; ``widths`` and
    ``head_splits`` are instructions for shrinking (attributes to rewrite afterwards). Every record
    is appended, so a :meth:`checkpoint` is a set of lengths and :meth:`rollback` truncates to them.
    """

    spaces: List[Space] = field(default_factory=list)
    n_elements: int = 0
    axis_spaces: Dict[Tuple[str, int], Space] = field(default_factory=dict)
    pairs: List[Coupling] = field(default_factory=list)
    frozen: List[Mark] = field(default_factory=list)
    inexact: List[Mark] = field(default_factory=list)
    producers: List[np.ndarray] = field(default_factory=list)  # elements that originate a structure
    widths: List[WidthRecord] = field(default_factory=list)
    # (module path, attribute) or ("config", id, attribute) -> the axis that size attribute sizes
    attribute_axes: Dict[tuple, np.ndarray] = field(default_factory=dict)
    head_splits: List[HeadSplit] = field(default_factory=list)
    # (elements that are whole units, n): the group of those elements must keep a multiple of n units
    multiples: List[Tuple[np.ndarray, int]] = field(default_factory=list)
    # tensor name, or module path + ".", -> why its spaces are frozen whenever they are created
    frozen_tensors: Dict[str, str] = field(default_factory=dict)

    def param_axis(self, tensor: str, dim: int, size: int) -> np.ndarray:
        """Elements of axis ``dim`` of the named tensor, created on first use."""
        key = (tensor, dim)
        space = self.axis_spaces.get(key)
        if space is None:
            space = Space(len(self.spaces), self.n_elements, size, tensor, dim)
            self.spaces.append(space)
            self.axis_spaces[key] = space
            self.n_elements += size
            # a tensor a failed rule reached stays frozen even when a later node creates its space afresh (see rollback)
            reason = self._frozen_reason(tensor) if self.frozen_tensors else None
            if reason is not None:
                self.freeze(space.elements, reason)
        # one axis seen with two sizes is a rule bug (a wrong dim): raising makes _apply_rule roll it back and freeze
        elif space.size != size:
            raise RuntimeError(f"{tensor} dim {dim} seen with sizes {space.size} and {size}")
        return space.elements

    def unify(self, a: AxisLabel, b: AxisLabel, op: str, size: Optional[int] = None) -> None:
        """Declare that index i of ``a`` and index i of ``b`` must be kept or dropped together."""
        if a is None and b is None:
            return
        n = size if size is not None else len(a) if a is not None else len(b)  # type: ignore[arg-type]
        a = np.full(n, UNLABELED, np.int64) if a is None else a
        b = np.full(n, UNLABELED, np.int64) if b is None else b
        if len(a) != len(b):
            raise RuntimeError(f"unify of lengths {len(a)} and {len(b)} at {op}")
        known_a, known_b = a >= 0, b >= 0
        both = known_a & known_b
        if both.any():
            self.pairs.append(Coupling(a[both], b[both], op))
        # an element facing an unlabelled index (a constant, a model input) can never be dropped on its side
        # alone, so it is frozen rather than silently left uncoupled
        lonely = np.concatenate([a[known_a & ~known_b], b[known_b & ~known_a]])
        if lonely.size:
            self.freeze(lonely, f"{op}: coupled to a tensor axis with no prunable channels")

    def freeze(self, elements: Union[AxisLabel, Sequence], reason: str) -> None:
        arr = _known(elements)
        if arr.size:
            self.frozen.append(Mark(arr, reason))

    def freeze_label(self, label: Label, reason: str) -> None:
        for axis in iter_axes(label):
            self.freeze(axis, reason)

    def mark_inexact(self, elements: AxisLabel, reason: str) -> None:
        arr = _known(elements)
        if arr.size:
            self.inexact.append(Mark(arr, reason))

    def mark_producer(self, elements: AxisLabel) -> None:
        arr = _known(elements)
        if arr.size:
            self.producers.append(arr)

    def record_width(self, path: str, attribute: str, elements: np.ndarray) -> None:
        self.widths.append(WidthRecord(path, attribute, elements))

    def record_head_split(self, split: HeadSplit) -> None:
        self.head_splits.append(split)

    def record_multiple(self, elements: AxisLabel, n: int) -> None:
        arr = _known(elements)
        if arr.size and n > 1:
            self.multiples.append((arr, n))

    def bind_attribute(self, key: tuple, axis: np.ndarray) -> np.ndarray:
        """The axis a size attribute sizes: the first one bound to ``key`` (``axis`` if none was)."""
        return self.attribute_axes.setdefault(key, axis)

    # ----- undoing a failed rule -----------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(len(self.spaces), self.n_elements, len(self.pairs), len(self.frozen), len(self.inexact),
                          len(self.producers), len(self.widths), len(self.head_splits), len(self.attribute_axes),
                          len(self.multiples))

    def rollback(self, checkpoint: Checkpoint) -> List[str]:
        """Forget everything recorded since ``checkpoint``; return the tensors whose new spaces were
        dropped (so that the caller can keep them frozen should a later node create them again)."""
        dropped = [space.tensor for space in self.spaces[checkpoint.spaces:]]
        for space in self.spaces[checkpoint.spaces:]:
            del self.axis_spaces[(space.tensor, space.dim)]
        # element ids are reused after a rollback (n_elements goes back), which is safe only because every record
        # that could name them is truncated here too; the caller discards the failed node's label
        for key in list(self.attribute_axes)[checkpoint.attribute_axes:]:  # dicts keep insertion order
            del self.attribute_axes[key]
        del self.spaces[checkpoint.spaces:], self.pairs[checkpoint.pairs:], self.frozen[checkpoint.frozen:]
        del self.inexact[checkpoint.inexact:], self.producers[checkpoint.producers:]
        del self.widths[checkpoint.widths:], self.head_splits[checkpoint.head_splits:]
        del self.multiples[checkpoint.multiples:]
        self.n_elements = checkpoint.n_elements
        return list(dict.fromkeys(dropped))

    def freeze_tensor(self, name: str, reason: str) -> None:
        """Freeze every space of tensor ``name`` (a name ending in ``.``: every tensor under that
        module path), now and whenever one is created later."""
        self.frozen_tensors.setdefault(name, reason)
        for space in self.spaces:
            if space.tensor == name or (name.endswith(".") and space.tensor.startswith(name)):
                self.freeze(space.elements, reason)

    def _frozen_reason(self, tensor: str) -> Optional[str]:
        reason = self.frozen_tensors.get(tensor)
        path = tensor
        while reason is None and "." in path:
            path = path.rpartition(".")[0]
            reason = self.frozen_tensors.get(path + ".")
        return reason


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
        # hook both roots onto the smaller one (``minimum.at`` is unbuffered: a root in several pairs keeps the
        # smallest). Pointers only decrease, so no cycle forms and each class ends at its smallest element
        np.minimum.at(root, ra, low)
        np.minimum.at(root, rb, low)
        while True:
            # compress by pointer jumping: each pass halves every path, so a few passes flatten the forest and
            # root[a], root[b] in the next round are true roots again
            nxt = root[root]
            if np.array_equal(nxt, root):
                break
            root = nxt
