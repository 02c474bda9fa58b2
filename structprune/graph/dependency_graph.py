"""Channel dependency graph: walk the captured graph with the op rules, then solve the couplings.

Result: the *units* (sets of channels that must be removed together: one filter and every slice
that follows it) and the *groups* (connected channel spaces; what criteria score and the planner
cuts). ``DependencyGraph.graph`` is a networkx view of channel spaces and the ops that couple them.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import networkx as nx
import numpy as np
import torch
from torch import fx, nn

from ..errors import InvalidModelError
from ..ops import RuleContext, has_module_rule, lookup, op_name
from ..ops.context import unlabeled
from .shapes import META_KEY, TensorMeta, propagate_shapes
from .labels import ChannelState, Label, Space, connected_components, has_labels
from .capture import Inputs, Trace, capture, eval_mode, mode


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


def named_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer under every name it is reachable by."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


ATTENTION_MODES = ("heads", "head_dims")


class DependencyGraph:
    """Coupled channel groups of ``model`` for ``example_input``.

    >>> dg = DependencyGraph(model, torch.randn(1, 3, 224, 224))
    >>> [g for g in dg.groups if g.prunable]
    """

    def __init__(self, model: nn.Module, example_input: Any, *, tracer: str = "auto", attention: str = "heads"):
        if not isinstance(model, nn.Module):
            raise InvalidModelError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, not {attention!r}")
        self.model = model
        self.inputs = Inputs.from_example(example_input)
        self.tensors = named_tensors(model)
        self.state = ChannelState(attention=attention)
        self.unknown_ops: Counter = Counter()
        self.notes: List[str] = []
        self.trace: Trace = capture(model, self.inputs, has_module_rule, tracer=tracer)
        with eval_mode(model):
            propagate_shapes(self.trace, self.trace.run_args(self.inputs))
        self.labels: Dict[fx.Node, Label] = self._walk(self.trace)
        self._walk_training_branches()
        self._solve()
        self._graph: Optional[nx.Graph] = None

    def _walk_training_branches(self) -> None:
        """Also couple what only runs in training mode (auxiliary heads), so that pruning for
        inference never breaks the model's training forward pass."""
        idle = _idle_tensor_names(self.trace, self.tensors)
        if not idle:
            return
        try:
            trace = capture(self.model, self.inputs, has_module_rule, training=True, tracer=self.trace.tracer)
            with mode(self.model, True), preserved_state(self.model):
                propagate_shapes(trace, trace.run_args(self.inputs))
        except Exception as error:  # the inference graph alone still yields a correct eval model
            self.notes.append(f"training-mode forward could not be traced ({type(error).__name__}); "
                              f"{len(idle)} tensors unused in eval mode were left alone")
            return
        self._walk(trace)

    # ----- label propagation ---------------------------------------------------------------------------
    def _walk(self, trace: Trace) -> Dict[fx.Node, Label]:
        """Run every node's rule in order; return the label of every node."""
        state, tensors = self.state, self.tensors
        canonical: Dict[int, str] = {}
        for name, t in tensors.items():
            canonical.setdefault(id(t), name)  # a shared tensor is known by its first name
        by_name = {name: canonical[id(t)] for name, t in tensors.items()}
        labels: Dict[fx.Node, Label] = {}
        ctx = RuleContext(trace.module, self.model, state, labels, canonical, exported=trace.tracer == "export")
        for node in trace.graph.nodes:
            meta = node.meta.get(META_KEY)
            if node.op == "placeholder":
                labels[node] = unlabeled(meta)
            elif node.op == "get_attr":
                labels[node] = self._attr_label(node, meta, by_name)
            elif node.op == "output":
                state.freeze_label(ctx.label(node.args[0]), "reaches a model output")
            else:
                labels[node] = self._apply_rule(ctx, node, meta)
        return labels

    def _attr_label(self, node: fx.Node, meta: Any, by_name: Dict[str, str]) -> Label:
        name = by_name.get(node.target)
        if name is None or not isinstance(meta, TensorMeta):
            return unlabeled(meta)
        return tuple(self.state.param_axis(name, d, s) if s > 1 else None for d, s in enumerate(meta.shape))

    def _apply_rule(self, ctx: RuleContext, node: fx.Node, meta: Any) -> Label:
        fn = lookup(node, ctx.modules)
        ctx.node, ctx.op = node, f"{op_name(node, ctx.modules)} ({node.name})"
        if fn is not None:
            state = self.state
            before = (state.n_elements, len(state.widths), len(state.head_splits))
            try:
                label = fn(ctx, node)
                if _matches(label, meta):
                    return label
                reason = "its rule returned a label of the wrong shape"
            except Exception as error:  # a rule bug must never break the model: freeze instead
                reason = f"its rule failed ({type(error).__name__}: {error})"
            # whatever the failed rule set up (new channel spaces, attributes to rewrite) is void
            state.freeze(np.arange(before[0], state.n_elements), f"{ctx.op}: {reason}")
            del state.widths[before[1]:], state.head_splits[before[2]:]
            if node.op == "call_module":
                self._freeze_module_tensors(node.target, f"{ctx.op}: {reason}")
        else:
            reason = "no rule for this op"
            if any(has_labels(ctx.label(a)) for a in ctx.tensor_inputs()):
                self.unknown_ops[op_name(node, ctx.modules)] += 1  # only ops that touch channels matter
        ctx.freeze_inputs(reason)
        return unlabeled(meta)

    def _freeze_module_tensors(self, path: str, reason: str) -> None:
        """Freeze every channel space of the parameters and buffers under module ``path``."""
        for space in self.state.spaces:
            if space.tensor.startswith(path + "."):
                self.state.freeze(space.elements, reason)

    # ----- solving the couplings -------------------------------------------------------------------------
    def _solve(self) -> None:
        """Units = element classes under the unifications; groups = spaces linked by shared units.

        Fully vectorised: one union-find over elements, one over (few) spaces, one ``np.unique``.
        """
        state = self.state
        n, n_spaces = state.n_elements, len(state.spaces)
        a = np.concatenate([p[0] for p in state.pairs]) if state.pairs else np.empty(0, np.int64)
        b = np.concatenate([p[1] for p in state.pairs]) if state.pairs else np.empty(0, np.int64)
        unit_root = self.unit_root = connected_components(n, a, b)
        sizes = np.array([sp.size for sp in state.spaces], dtype=np.int64)
        element_space = np.repeat(np.arange(n_spaces), sizes)  # spaces own consecutive element ranges
        # two spaces are in one group when an element of one shares a unit with an element of the other
        space_group = connected_components(n_spaces, element_space, element_space[unit_root])
        element_group = space_group[element_space]

        frozen = np.zeros(n, bool)
        reasons: Dict[int, str] = {}
        for arr, why in state.frozen:
            roots = unit_root[arr]
            frozen[roots] = True
            for r in np.unique(roots[:64]).tolist():
                reasons.setdefault(r, why)
        inexact_groups = set(np.unique(element_group[np.concatenate([e for e, _ in state.inexact])]).tolist()) \
            if state.inexact else set()
        # elements whose group only sees per-channel ops: their pruning can be checked value for value
        self.exact_elements = ~np.isin(element_group, np.fromiter(inexact_groups, np.int64, len(inexact_groups)))
        producer_elements = np.concatenate(state.producers) if state.producers else np.empty(0, np.int64)
        producer_groups = set(np.unique(element_group[producer_elements]).tolist())
        is_producer = np.zeros(n, bool)
        is_producer[producer_elements] = True

        # number the units of every group 0..k-1: order the roots by group (stable keeps them ascending)
        roots = np.flatnonzero(unit_root == np.arange(n))
        order = np.argsort(element_group[roots], kind="stable")
        sorted_groups = element_group[roots][order]
        first = np.searchsorted(sorted_groups, sorted_groups)
        local_of_root = np.empty(len(roots), np.int64)
        local_of_root[order] = np.arange(len(roots)) - first
        position = np.empty(n, np.int64)
        position[roots] = np.arange(len(roots))
        local = local_of_root[position[unit_root]]
        counts = np.bincount(sorted_groups, minlength=n_spaces)

        by_group: Dict[int, List[Space]] = {}
        for space in state.spaces:
            by_group.setdefault(int(space_group[space.id]), []).append(space)
        self.groups: List[Group] = []
        for gid, (root, spaces) in enumerate(by_group.items()):
            index = [local[sp.start:sp.start + sp.size] for sp in spaces]
            lo = int(np.searchsorted(sorted_groups, root))
            units = roots[order[lo:lo + counts[root]]]
            unit_frozen = frozen[units]
            group_reasons = [reasons[u] for u in units[unit_frozen][:8].tolist() if u in reasons]
            origin = np.full(int(counts[root]), -1, np.int64)
            for k in range(len(spaces) - 1, -1, -1):  # the first producing space wins
                if is_producer[spaces[k].start]:
                    origin[index[k]] = k
            self.groups.append(Group(gid, spaces, index, int(counts[root]), unit_frozen, group_reasons, units,
                                     origin, root not in inexact_groups, root in producer_groups))
            for sp in spaces:
                sp.group = gid

    # ----- inspection -----------------------------------------------------------------------------------
    @property
    def prunable_groups(self) -> List[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def graph(self) -> nx.Graph:
        """networkx graph: one node per channel space, one edge per coupling (attribute ``ops``)."""
        if self._graph is None:
            g = nx.Graph()
            for s in self.state.spaces:
                g.add_node(s.id, tensor=s.tensor, dim=s.dim, size=s.size, group=getattr(s, "group", None))
            starts = np.array([s.start for s in self.state.spaces], dtype=np.int64)
            for a, b, op in self.state.pairs:
                sa = np.searchsorted(starts, a, side="right") - 1
                sb = np.searchsorted(starts, b, side="right") - 1
                for u, v in set(zip(sa.tolist(), sb.tolist())):
                    if u != v:
                        if g.has_edge(u, v):
                            g.edges[u, v]["ops"].add(op)
                        else:
                            g.add_edge(u, v, ops={op})
            self._graph = g
        return self._graph

    def label_of(self, node: fx.Node) -> Label:
        return self.labels.get(node)

    def summary(self, limit: Optional[int] = None) -> str:
        """A table: group id, width (channels pruned together count once), member tensors, and
        prunable or frozen with the reason; ``limit`` rows at most."""
        prunable = self.prunable_groups
        lines = [f"{len(self.groups)} groups, {len(prunable)} prunable, traced with {self.trace.tracer}",
                 f"{'group':>5}  {'width':>6}  {'members':>7}  {'status':<9}  first member / why frozen"]
        for group in self.groups[:limit]:
            status = "prunable" if group.prunable else "frozen"
            detail = str(group.spaces[0]) if group.prunable else (group.frozen_reason or "")
            lines.append(f"{group.id:>5}  {group.n_units:>6}  {len(group.spaces):>7}  {status:<9}  {detail[:90]}")
        if limit is not None and len(self.groups) > limit:
            lines.append(f"... {len(self.groups) - limit} more groups")
        if self.unknown_ops:
            ops = ", ".join(f"{k} x{v}" for k, v in self.unknown_ops.most_common())
            lines.append(f"ops without a rule (their channels are kept whole): {ops}")
        return "\n".join(lines)

    def to_networkx(self) -> nx.Graph:
        """The channel-space graph (see :attr:`graph`), for networkx's algorithms and drawing."""
        return self.graph

    def write(self, path: str) -> None:
        """Write the channel-space graph as GraphML (``.graphml``) or Graphviz DOT (``.dot``)."""
        g = nx.Graph()
        for node, data in self.graph.nodes(data=True):
            group = self.groups[data["group"]] if data["group"] is not None else None
            g.add_node(node, tensor=data["tensor"], dim=data["dim"], size=data["size"],
                       group=-1 if group is None else group.id, prunable=bool(group is not None and group.prunable))
        for u, v, data in self.graph.edges(data=True):
            g.add_edge(u, v, ops="; ".join(sorted(data["ops"])))
        if path.endswith(".graphml"):
            nx.write_graphml(g, path)
        elif path.endswith(".dot"):
            with open(path, "w") as f:
                f.write(_dot(g))
        else:
            raise ValueError(f"write() knows .graphml and .dot files, not {path!r}")


def _idle_tensor_names(trace: Trace, tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Parameters/buffers the captured graph never reads, directly or through a leaf module."""
    read = {n.target for n in trace.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in trace.graph.nodes if n.op == "call_module"}

    def used(name: str) -> bool:
        if name in read:
            return True
        path = name.rpartition(".")[0]
        while path:
            if path in called:
                return True
            path = path.rpartition(".")[0]
        return False

    return [name for name in tensors if not used(name)]


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Undo what a training-mode forward pass changes: buffers (BatchNorm statistics) and the RNG."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def _has_tensor(meta: Any) -> bool:
    if isinstance(meta, TensorMeta):
        return True
    if isinstance(meta, (list, tuple)):
        return any(_has_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_has_tensor(m) for m in meta.values())
    return False


def _matches(label: Label, meta: Any) -> bool:
    """Does a rule's label have the structure of the node's value?"""
    if isinstance(meta, TensorMeta):
        return isinstance(label, tuple) and len(label) == meta.ndim and all(
            ax is None or (isinstance(ax, np.ndarray) and ax.shape == (meta.shape[k],))
            for k, ax in enumerate(label))
    if isinstance(meta, (list, tuple)) and not isinstance(meta, torch.Size):
        items = list(meta)
        return label is None and not _has_tensor(meta) or (
            isinstance(label, list) and len(label) == len(items) and all(_matches(l, m) for l, m in zip(label, items)))
    if isinstance(meta, dict):
        return isinstance(label, list) and len(label) == len(meta) and all(
            _matches(l, m) for l, m in zip(label, meta.values()))
    return label is None


def _dot(g: nx.Graph) -> str:
    """Graphviz DOT text of the channel-space graph: one node per space, grouped by colour."""
    def quote(text) -> str:
        escaped = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'

    palette = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5"]
    lines = ["graph channels {", "  node [shape=box, style=filled, fontsize=10];"]
    for node, data in g.nodes(data=True):
        colour = palette[data["group"] % len(palette)] if data["prunable"] else "#d9d9d9"
        label = f"{data['tensor']}[{data['dim']}] x{data['size']}\ngroup {data['group']}"
        lines.append(f"  {node} [label={quote(label)}, fillcolor={quote(colour)}];")
    for u, v, data in g.edges(data=True):
        lines.append(f"  {u} -- {v} [tooltip={quote(data['ops'])}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
