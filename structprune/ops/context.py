"""What a rule sees: its node, the labels and example shapes of its inputs; and what it may record."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import fx, nn

from ..graph.labels import AxisLabel, ChannelState, HeadSplit, Label, TensorLabel
from ..graph.shapes import META_KEY, TensorMeta


class RuleContext:
    """Helpers shared by all rules; one instance serves a whole graph walk."""

    def __init__(self, root: nn.Module, model: nn.Module, state: ChannelState, labels: Dict[fx.Node, Label],
                 canonical: Dict[int, str], exported: bool = False, attention: str = "heads"):
        self.root = root  # the traced GraphModule
        self.modules = dict(root.named_modules())
        self.model = model  # the caller's model: module classes and attributes live here
        self._state = state  # rules record through the methods below, never on the state directly
        self.labels = labels
        self._canonical = canonical  # id(tensor) -> canonical fully-qualified name
        self.exported = exported  # torch.export bakes every shape read into the graph as a literal
        self.attention = attention  # what a head split prunes: whole "heads" or the same "head_dims" in each
        self._node: Optional[fx.Node] = None  # set by the graph walk before each rule runs
        self.op = ""

    @property
    def node(self) -> fx.Node:
        """The node whose rule is running."""
        if self._node is None:
            raise RuntimeError("RuleContext.node read outside a rule: no node is being labelled")
        return self._node

    @node.setter
    def node(self, node: fx.Node) -> None:
        self._node = node

    # ----- reading the node -------------------------------------------------------------------
    def arg(self, index: int, name: Optional[str] = None, default: Any = None) -> Any:
        node = self.node
        if index < len(node.args):
            return node.args[index]
        if name is not None and name in node.kwargs:
            return node.kwargs[name]
        return default

    def label(self, value: Any) -> Label:
        """Label of an argument: a node's label, or None for literals."""
        if isinstance(value, fx.Node):
            return self.labels.get(value)
        if isinstance(value, (list, tuple)):
            return [self.label(v) for v in value]
        if isinstance(value, dict):
            return [self.label(v) for v in value.values()]
        return None

    def tlabel(self, value: Any) -> TensorLabel:
        """Label of a tensor argument, with one entry per axis (None where unlabelled)."""
        meta = self.meta(value)
        label = self.label(value)
        if not isinstance(meta, TensorMeta):
            return ()
        # a node without a recorded label (walked before it, or voided) reads as unlabelled, never as missing
        if not isinstance(label, tuple) or len(label) != meta.ndim:
            return (None,) * meta.ndim
        return label

    def meta(self, value: Any) -> Any:
        if isinstance(value, fx.Node):
            return value.meta.get(META_KEY)
        return value

    @property
    def out(self) -> Any:
        return self.node.meta.get(META_KEY)

    def is_tensor(self, value: Any) -> bool:
        return isinstance(self.meta(value), TensorMeta)

    @property
    def module_path(self) -> str:
        """Qualified name of the module a ``call_module`` node calls."""
        target = self.node.target
        if not isinstance(target, str):
            raise TypeError(f"{self.op}: not a call_module node (its target is {target!r})")
        return target

    @property
    def module(self) -> nn.Module:
        return self.modules[self.module_path]

    def tensor_inputs(self) -> list:
        found = []

        def visit(a):
            if isinstance(a, fx.Node):
                found.append(a)
            elif isinstance(a, (list, tuple)):
                for item in a:
                    visit(item)
            elif isinstance(a, dict):
                for item in a.values():
                    visit(item)

        visit(self.node.args)
        visit(self.node.kwargs)
        return found

    # ----- parameters -------------------------------------------------------------------------
    def param_axis(self, owner: nn.Module, owner_path: str, name: str, dim: int) -> AxisLabel:
        """Elements of axis ``dim`` of ``owner.<name>`` (None when the tensor is absent)."""
        tensor = getattr(owner, name, None)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim <= dim:
            return None
        fqn = self._canonical.get(id(tensor))
        if fqn is None:  # computed on access (weight_norm, parametrizations): nothing we can slice
            return None
        return self._state.param_axis(fqn, dim, tensor.shape[dim])

    def module_param(self, name: str, dim: int) -> AxisLabel:
        return self.param_axis(self.module, self.module_path, name, dim)

    def own_attribute(self, weight_node: Any, cls: type, attribute: str, literal: Any) -> bool:
        """Is ``literal`` (a constant baked into the graph) the current value of ``attribute`` of the
        ``cls`` module that owns ``weight_node`` *and* whose own forward makes this call? Then it is
        that module's attribute, which its updater refreshes after pruning, not a hard-coded size."""
        if getattr(weight_node, "op", None) != "get_attr" or literal is None:
            return False
        owner_path = weight_node.target.rpartition(".")[0]
        stack = self.node.meta.get("nn_module_stack") or {}
        # the innermost module on the stack is the one whose forward makes the call; a literal passed in by a
        # parent (a blur with groups=channels around a conv) equals the attribute by chance only
        if not stack or list(stack.values())[-1][0] != owner_path:
            return False
        try:
            owner = self.model.get_submodule(owner_path)
        except AttributeError:
            return False
        value = getattr(owner, attribute, None)
        # ``normalized_shape`` is stored as a tuple but may be baked into the graph as a list
        value = tuple(value) if isinstance(value, (list, tuple)) else value
        return isinstance(owner, cls) and value == literal

    def calling_path(self) -> str:
        """Path of the module whose own forward makes this call (``""``: the model itself)."""
        stack = self.node.meta.get("nn_module_stack") or {}
        return list(stack.values())[-1][0] if stack else ""

    def calling_module(self) -> Optional[nn.Module]:
        path = self.calling_path()
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    # ----- acting on labels -------------------------------------------------------------------
    def unify(self, a: AxisLabel, b: AxisLabel, size: Optional[int] = None) -> None:
        self._state.unify(a, b, self.op, size)

    def unify_all(self, axes: Sequence[AxisLabel], size: int) -> AxisLabel:
        """Unify several axes of one length; return a representative label (None if all None).

        An unlabelled axis among labelled ones freezes them: it cannot drop channels.
        """
        present = [a for a in axes if a is not None]
        if not present:
            return None
        first = present[0]
        for other in present[1:]:
            # the same array twice (x + x, one tensor read twice) needs no coupling
            if other is not first:
                self.unify(first, other, size)
        # unifying with None freezes ``first``, and through the couplings just made, every other axis too
        if len(present) < len(axes):
            self.unify(first, None, size)
        return first

    def attach(self, member: AxisLabel, axis: AxisLabel, size: Optional[int] = None) -> None:
        """Make an optional parameter axis (a bias, a BN buffer) follow ``axis``; absent ones are skipped."""
        if member is not None:
            self.unify(member, axis, size if size is not None else len(member))

    def freeze(self, label: Any, why: str) -> None:
        if isinstance(label, np.ndarray):
            self._state.freeze(label, f"{self.op}: {why}")
        else:
            self._state.freeze_label(label, f"{self.op}: {why}")

    def freeze_inputs(self, why: str) -> None:
        for arg in self.tensor_inputs():
            self.freeze(self.label(arg), why)

    def unlabeled_output(self) -> Label:
        return unlabeled(self.out)

    def mark_producer(self, axis: AxisLabel) -> None:
        """The elements of ``axis`` originate a structure (a layer's output channels): a group
        without any such elements has nothing to remove."""
        self._state.mark_producer(axis)

    def require_multiple(self, axis: AxisLabel, n: int) -> None:
        """The elements of ``axis`` are whole units (heads), and their group must keep a multiple of
        ``n`` of them (PyTorch's fused attention needs an even head count): the planner rounds to it."""
        self._state.record_multiple(axis, n)

    def mark_inexact(self, axis: AxisLabel, why: str) -> None:
        """Pruning ``axis`` changes values beyond zeroing it (statistics over channels): the
        verifier compares such groups approximately."""
        self._state.mark_inexact(axis, why)

    # ----- instructions for after shrinking -----------------------------------------------------
    def record_width(self, path: str, attribute: str, axis: np.ndarray) -> None:
        """``<path>.<attribute>`` states the width of ``axis``, which no tensor records: it is set to
        the number of kept elements after pruning."""
        self._state.record_width(path, attribute, axis)

    def record_head_split(self, path: str, heads: Union[np.ndarray, int], dims: Union[np.ndarray, int]) -> None:
        """The forward of module ``path`` splits a projection into (heads, head_dim): its head-count
        and head-size attributes are rewritten after pruning (an int: that size never changes)."""
        self._state.record_head_split(HeadSplit(path, heads, dims))

    def bind_attribute(self, key: tuple, axis: np.ndarray) -> np.ndarray:
        """The axis a size attribute (``key``) sizes: the first axis bound to it, else ``axis``."""
        return self._state.bind_attribute(key, axis)


def unlabeled(meta: Any) -> Label:
    """An all-None label of the same structure as ``meta``."""
    if isinstance(meta, TensorMeta):
        return (None,) * meta.ndim
    if isinstance(meta, (list, tuple)):
        return [unlabeled(m) for m in meta]
    if isinstance(meta, dict):
        return [unlabeled(m) for m in meta.values()]
    return None


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim
