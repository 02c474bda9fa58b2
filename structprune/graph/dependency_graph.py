"""Channel dependency graph: walk the captured graph with the op rules, then solve the couplings.

Result: the *units* (sets of channels that must be removed together: one filter and every slice
that follows it) and the *groups* (connected channel spaces; what criteria score and the planner
cuts). ``DependencyGraph.graph`` is a networkx view of channel spaces and the ops that couple them.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import fx, nn

from ..errors import InvalidOptionError, RuleError
from ..ops import RuleContext, has_module_rule, lookup, op_name, shape_function_for, traced_forward_for
from ..ops.context import unlabeled
from ..ops.registry import rules_are_strict
from ..ops.thirdparty.transformers import tie_mirrored_buffers
from ..options import TraceOptions, check_integer, require_prunable
from .capture import Inputs, Trace, capture, eval_mode, mode
from .example_input import check_input_dtype
from .inspect import to_dot
from .labels import ChannelState, Checkpoint, HeadSplit, Label, Space, WidthRecord, has_labels
from .shapes import META_KEY, TensorMeta, fits, propagate_shapes
from .solve import Group, solve

if TYPE_CHECKING:  # networkx is imported where a graph is built: it costs about a second of start-up
    import networkx as nx


def named_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer under every name it is reachable by."""
    tensors: Dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def canonical_names(tensors: Dict[str, torch.Tensor]) -> Dict[int, str]:
    """``id`` of each tensor -> the first name it is reachable by: a shared (tied) tensor has one name, the one
    channel spaces use."""
    canonical: Dict[int, str] = {}
    for name, t in tensors.items():
        canonical.setdefault(id(t), name)
    return canonical



class DependencyGraph:
    """Coupled channel groups of ``model`` for ``example_input``.

    Examples:
        >>> dg = DependencyGraph(model, torch.randn(1, 3, 224, 224))
        >>> [g for g in dg.groups if g.prunable]
    """

    def __init__(self, model: nn.Module, example_input: Any, *, tracer: str = "auto", attention: str = "heads"):
        self.model = require_prunable(model)  # a ScriptModule is refused here with what to pass instead
        TraceOptions(tracer=tracer, attention=attention)  # validates both, with what to pass instead
        self.inputs = Inputs.from_example(example_input)
        check_input_dtype(model, self.inputs)  # an fp16 input into an fp32 model: say so, not a conv's dtype error
        self.tensors = named_tensors(model)
        self.attention = attention  # what a head split prunes: whole "heads" or the same "head_dims"
        self.state = ChannelState()
        self.unknown_ops: Counter = Counter()
        self.notes: List[str] = []
        self.trace: Trace = capture(model, self.inputs, has_module_rule, tracer=tracer,
                                      stand_in=traced_forward_for)
        # shapes in eval mode: the labels must describe the inference graph, and a training-mode pass would move
        # BatchNorm statistics and consume RNG on the caller's model
        with eval_mode(model):
            propagate_shapes(self.trace, self.trace.run_args(self.inputs), shape_function_for)
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
            # tracing too: fx runs the forward's Python on the real buffers (timm's BatchNormAct2d increments
            # num_batches_tracked in training mode)
            with mode(self.model, True), preserved_state(self.model):
                trace = capture(self.model, self.inputs, has_module_rule, training=True, tracer=self.trace.tracer,
                                stand_in=traced_forward_for)
                propagate_shapes(trace, trace.run_args(self.inputs), shape_function_for)
        except Exception as error:  # the inference graph alone still yields a correct eval model
            self.notes.append(f"training-mode forward could not be traced ({type(error).__name__}); "
                              f"{len(idle)} tensors unused in eval mode were left alone")
            return
        # the training walk writes into the same state, so its couplings meet the eval walk's in one union-find;
        # its labels are dropped (later stages read the eval graph only)
        self._walk(trace)

    # ----- label propagation ---------------------------------------------------------------------------
    def _walk(self, trace: Trace) -> Dict[fx.Node, Label]:
        """Run every node's rule in order; return the label of every node."""
        state, tensors = self.state, self.tensors
        canonical = canonical_names(tensors)  # a shared tensor is known by its first name
        # every alias resolves to one name, so tied weights (embedding and LM head) share one space and stay tied
        by_name = {name: canonical[id(t)] for name, t in tensors.items()}
        labels: Dict[fx.Node, Label] = {}
        ctx = RuleContext(trace.module, self.model, state, labels, canonical, exported=trace.tracer == "export",
                          attention=self.attention)
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
        tie_mirrored_buffers(state, tensors, canonical)
        return labels

    def _attr_label(self, node: fx.Node, meta: Any, by_name: Dict[str, str]) -> Label:
        name = by_name.get(str(node.target))
        if name is None or not isinstance(meta, TensorMeta):
            return unlabeled(meta)
        # no space for a size-1 axis: one channel is always kept, and it is a broadcast axis ((1, C, 1, 1) scales)
        return tuple(self.state.param_axis(name, d, s) if s > 1 else None for d, s in enumerate(meta.shape))

    def _apply_rule(self, ctx: RuleContext, node: fx.Node, meta: Any) -> Label:
        fn = lookup(node, ctx.modules)
        ctx.node, ctx.op = node, f"{op_name(node, ctx.modules)} ({node.name})"
        if fn is None:
            if any(has_labels(ctx.label(a)) for a in ctx.tensor_inputs()):
                self.unknown_ops[op_name(node, ctx.modules)] += 1  # only ops that touch channels matter
            ctx.freeze_inputs("no rule for this op")
            return unlabeled(meta)
        # checkpoint first: a rule may have recorded couplings before it raised, and half a rule is worse than none
        checkpoint = self.state.checkpoint()
        try:
            label = fn(ctx, node)
        except Exception as error:  # a rule bug must never break the model: freeze instead
            if rules_are_strict():
                raise
            reason = f"its rule failed ({type(error).__name__}: {error})"
        else:
            # a label of the wrong length would silently mislabel every consumer downstream: treat it as a failure
            if fits(label, meta):
                return label
            reason = "its rule returned a label of the wrong shape"
            if rules_are_strict():
                raise RuleError(f"{ctx.op}: {reason}")
        self._void(node, checkpoint, f"{ctx.op}: {reason}")
        ctx.freeze_inputs(reason)
        return unlabeled(meta)

    def _void(self, node: fx.Node, checkpoint: Checkpoint, reason: str) -> None:
        """Undo everything a failed rule recorded (couplings, freezes, spaces, attributes to rewrite),
        and keep the tensors it reached frozen: the spaces it created, and for a module call every
        tensor of the module, also if a later node creates their spaces."""
        for tensor in self.state.rollback(checkpoint):
            self.state.freeze_tensor(tensor, reason)
        # a failed module rule may have touched any of its tensors, spaces created earlier included: freeze them all
        if node.op == "call_module":
            self.state.freeze_tensor(f"{node.target}.", reason)

    # ----- solving the couplings -------------------------------------------------------------------------
    def _solve(self) -> None:
        """Units and groups from the recorded couplings (see :func:`.solve.solve`)."""
        self.unit_root, self.exact_elements, self.groups = solve(self.state)

    # ----- reading the result (later stages use these, never ``state``) ---------------------------------
    @property
    def prunable_groups(self) -> List[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def spaces(self) -> Tuple[Space, ...]:
        """Every channel space, in element order (space k owns elements ``start .. start + size``)."""
        return tuple(self.state.spaces)

    @property
    def n_elements(self) -> int:
        """Number of channel elements: the length of an element mask such as ``Plan.element_mask``."""
        return self.state.n_elements

    def space_of(self, tensor: str, dim: int) -> Optional[Space]:
        """The channel space of axis ``dim`` of the named parameter or buffer (None: not prunable)."""
        return self.state.axis_spaces.get((tensor, dim))

    def producer_mask(self) -> np.ndarray:
        """Per element: does it originate a structure (a layer's output channel, not a follower)?"""
        mask = np.zeros(self.state.n_elements, bool)
        for elements in self.state.producers:
            mask[elements] = True
        return mask

    @property
    def head_splits(self) -> Tuple[HeadSplit, ...]:
        """Where projections split into heads: the size attributes shrinking rewrites."""
        return tuple(self.state.head_splits)

    @property
    def widths(self) -> Tuple[WidthRecord, ...]:
        """Module attributes that state a width no tensor records, to set after shrinking."""
        return tuple(self.state.widths)

    @property
    def graph(self) -> nx.Graph:
        """networkx graph: one node per channel space, one edge per coupling (attribute ``ops``)."""
        if self._graph is None:
            import networkx as nx

            g = nx.Graph()
            for s in self.state.spaces:
                g.add_node(s.id, tensor=s.tensor, dim=s.dim, size=s.size, group=getattr(s, "group", None))
            starts = np.array([s.start for s in self.state.spaces], dtype=np.int64)
            for a, b, op in self.state.pairs:
                # spaces own consecutive ranges with ascending starts: the last start <= element is its space
                sa = np.searchsorted(starts, a, side="right") - 1
                sb = np.searchsorted(starts, b, side="right") - 1
                for u, v in set(zip(sa.tolist(), sb.tolist())):
                    # a coupling inside one space (grouped conv, head split) is no edge between spaces
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
        if limit is not None:
            limit = check_integer("limit", limit, low=0, example="limit=40 (or None for every group)")
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
        import networkx as nx

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
                f.write(to_dot(g))
        else:
            raise InvalidOptionError(f"write() knows .graphml and .dot files, not {path!r}: pass a path ending in one")


def _idle_tensor_names(trace: Trace, tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Parameters/buffers the captured graph never reads, directly or through a leaf module."""
    read = {n.target for n in trace.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in trace.graph.nodes if n.op == "call_module"}

    def used(name: str) -> bool:
        if name in read:
            return True
        path = name.rpartition(".")[0]
        while path:
            # a leaf module call reads every tensor below it, so any called ancestor counts as a use
            if path in called:
                return True
            path = path.rpartition(".")[0]
        return False

    return [name for name in tensors if not used(name)]


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Undo what a training-mode forward pass changes: buffers (BatchNorm statistics) and the RNG."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    # fork_rng restores the CPU generator and the CUDA devices named: the training forward's dropout draws from them
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
