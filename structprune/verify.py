"""Verification: the pruned model must reproduce the original with the dropped channels zeroed.

:class:`ZeroingInterpreter` runs the original captured graph and zeroes the dropped channels in every
tensor whose axes carry them. Where every op on the pruned axes is per-channel, the pruned model
must match that reference to float tolerance; where an op mixes channels (LayerNorm or softmax over
a pruned axis) only shapes and finiteness can be checked, and the result says so.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, cast

import numpy as np
import torch
from torch import fx, nn

from .errors import VerificationError
from .graph.capture import eval_mode, output_tensors
from .graph.dependency_graph import DependencyGraph
from .graph.labels import Label
from .surgery.shrink import shrunk_copy

RTOL = 1e-4  # relative to the largest reference magnitude: pruning only reorders float sums


@dataclass
class VerificationResult:
    passed: bool
    exact: bool  # True: values compared; False: shapes and finiteness only
    max_abs_error: float
    message: str

    def __str__(self) -> str:
        return self.message


def _zero_dropped(value: Any, label: Label, dropped: np.ndarray) -> Any:
    if isinstance(value, torch.Tensor) and isinstance(label, tuple) and len(label) == value.ndim:
        for axis, elements in enumerate(label):
            if elements is None:
                continue
            # clip -1 to a valid index for the lookup; the (elements >= 0) term masks those entries out again
            gone = (elements >= 0) & dropped[np.maximum(elements, 0)]
            if gone.any():
                shape = [1] * value.ndim
                shape[axis] = len(elements)
                keep = torch.as_tensor(~gone, device=value.device).reshape(shape)
                # multiply by a broadcast mask rather than slicing: the reference keeps the original shapes throughout
                value = value * keep.to(value.dtype) if value.is_floating_point() else value * keep
        return value
    if isinstance(value, (tuple, list)) and isinstance(label, list) and len(label) == len(value):
        items = [_zero_dropped(item, item_label, dropped) for item, item_label in zip(value, label)]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict) and isinstance(label, list) and len(label) == len(value):
        return {key: _zero_dropped(item, item_label, dropped) for (key, item), item_label in zip(value.items(), label)}
    return value


class ZeroingInterpreter(fx.Interpreter):
    """Run the captured original graph, zeroing every dropped channel in every labelled tensor."""

    def __init__(self, module: nn.Module, graph: fx.Graph, labels: Dict[fx.Node, Label], dropped: np.ndarray):
        super().__init__(module, graph=graph)
        self._labels = labels
        self._dropped = dropped

    def run_node(self, n: fx.Node) -> Any:
        # zero after every node, not only after the producing layer: a BatchNorm shift or a bias would make a
        # dropped channel non-zero again, and the next layer would read what the pruned model no longer has
        return _zero_dropped(super().run_node(n), self._labels.get(n), self._dropped)


@contextlib.contextmanager
def _zeroed_leaf_parameters(dg: DependencyGraph, dropped: np.ndarray):
    """Swap in copies of leaf modules' parameters with the dropped channels zeroed, for the block.

    The interpreter zeroes activations between nodes; a leaf module called as one node (an
    ``nn.MultiheadAttention`` whose heads are pruned) also loses channels *inside* it, which only
    its own weights can show. The caller's tensors are swapped back untouched: not even their
    autograd version counters change."""
    leaves = [n.target for n in dg.trace.graph.nodes if n.op == "call_module"]
    # only parameters used inside a leaf module need this; get_attr tensors are zeroed as node outputs
    owned = {f"{path}.{name}" for path in leaves for name, _ in dg.trace.module.get_submodule(path).named_parameters()}
    zeroed: Dict[int, torch.Tensor] = {}
    for space in dg.spaces:
        gone = np.flatnonzero(space.of(dropped))
        if space.tensor in owned and gone.size:
            path, _, attr = space.tensor.rpartition(".")
            tensor = getattr(dg.model.get_submodule(path), attr)
            # a weight pruned on two dims accumulates both fills; index_fill returns a new tensor, the caller's stays
            base = zeroed.get(id(tensor), tensor.detach())
            zeroed[id(tensor)] = base.index_fill(space.dim, torch.as_tensor(gone, device=tensor.device), 0)
    swapped = []
    try:
        for module in dg.model.modules():
            for name, t in list(module._parameters.items()):
                if t is not None and id(t) in zeroed:
                    swapped.append((module, name, t))
                    # straight into the slot dict: setattr would refuse a plain tensor where a Parameter is registered
                    # (hence the slots typed wider than torch declares them)
                    slots = cast(Dict[str, Optional[torch.Tensor]], module._parameters)
                    slots[name] = zeroed[id(t)]
        yield
    finally:
        for module, name, t in reversed(swapped):
            module._parameters[name] = t


def zeroed_reference(dg: DependencyGraph, dropped: np.ndarray) -> Any:
    """Outputs of the original model with every dropped channel zeroed (run before shrinking, since an
    in-place shrink changes the very modules the captured graph calls)."""
    with torch.no_grad(), eval_mode(dg.model), _zeroed_leaf_parameters(dg, dropped):
        return ZeroingInterpreter(dg.trace.module, dg.trace.graph, dg.labels, dropped).run(
            *dg.trace.run_args(dg.inputs))


def is_exact(dg: DependencyGraph, dropped: np.ndarray) -> bool:
    """Can values be compared? Only if every group that loses channels has only per-channel ops."""
    return not (dropped & ~dg.exact_elements).any()


def verify(dg: DependencyGraph, pruned: nn.Module, dropped: np.ndarray, reference: Any = None,
           exact: Optional[bool] = None) -> VerificationResult:
    """Compare ``pruned`` on the example input with the zeroed original (``reference`` if precomputed)."""
    # fresh inputs: an in-place op in the pruned forward must not alter the example input used again later
    inputs = dg.inputs.cloned()
    if exact is None:
        exact = is_exact(dg, dropped)
    if reference is None:
        reference = zeroed_reference(dg, dropped)
    with torch.no_grad(), eval_mode(pruned):
        try:
            result = pruned(*inputs.args, **inputs.kwargs)
        except Exception as error:
            return VerificationResult(False, exact, float("inf"),
                                      f"the pruned model failed to run: {type(error).__name__}: {error}")
    ref_items, out_items = output_tensors(reference), output_tensors(result)
    if len(ref_items) != len(out_items):
        return VerificationResult(False, exact, float("inf"),
                                  f"the pruned model returns {len(out_items)} tensors, the original {len(ref_items)}")
    worst = 0.0
    for k, (ref, out) in enumerate(zip(ref_items, out_items)):
        if ref.shape != out.shape:
            return VerificationResult(False, exact, float("inf"),
                                      f"output {k} has shape {tuple(out.shape)} instead of {tuple(ref.shape)}")
        if not out.is_floating_point():
            if exact and not torch.equal(ref, out):
                return VerificationResult(False, exact, float("inf"), f"integer output {k} differs")
            continue
        # a reference that is already non-finite (masked -inf logits) says nothing here, so only a finite one counts
        if not torch.isfinite(out).all() and torch.isfinite(ref).all():
            return VerificationResult(False, exact, float("inf"), f"output {k} has non-finite values")
        if exact and ref.numel():
            scale = ref.abs().max().item()
            err = (ref - out).abs().max().item()
            worst = max(worst, err / max(scale, 1e-12))
            # relative to the largest magnitude, not element-wise: pruning reorders sums, so small outputs carry
            # the absolute rounding error of large ones; the 1e-6 floors keep all-zero outputs comparable
            if err > RTOL * max(scale, 1e-6) + 1e-6:
                return VerificationResult(False, exact, err / max(scale, 1e-12),
                                          f"output {k} differs from the zeroed original by {err:.3g} "
                                          f"(largest reference magnitude {scale:.3g})")
    kind = "matches the zeroed original" if exact else \
        "has the original's output shapes and finite values (a channel-mixing op such as LayerNorm makes an " \
        "exact comparison impossible)"
    return VerificationResult(True, exact, worst, f"verification passed: the pruned model {kind}")


class Verifier:
    """The one verifier every entry point uses: the zeroed reference is computed before shrinking
    (an in-place shrink changes the very modules the captured graph calls), the verdict after.

    When some pruned channels meet channel-mixing ops (LayerNorm, softmax), the full result can only
    be checked for shapes and finiteness. The other channels are then pruned alone on a copy and
    checked value for value, so a mistake outside the mixing ops cannot hide behind them.
    """

    def __init__(self, dg: DependencyGraph, dropped: np.ndarray):
        self.dg, self.dropped = dg, dropped
        self.exact_part: Optional[VerificationResult] = None
        # dropping only the channels whose groups see per-channel ops gives a model that must match exactly
        subset = dropped & dg.exact_elements
        if not is_exact(dg, dropped) and subset.any():
            self.exact_part = verify(dg, shrunk_copy(dg.model, dg, subset), subset, zeroed_reference(dg, subset),
                                     exact=True)
            if not self.exact_part.passed:
                raise VerificationError(self.explain(self.exact_part))
        self.reference = zeroed_reference(dg, dropped)

    def check(self, pruned: nn.Module) -> VerificationResult:
        """The verdict on ``pruned``; raises :class:`VerificationError` when it fails."""
        result = verify(self.dg, pruned, self.dropped, self.reference)
        if not result.passed:
            raise VerificationError(self.explain(result))
        if self.exact_part is not None:
            result.message += (f"; the channels outside channel-mixing ops, pruned alone, match the zeroed "
                               f"original exactly (relative error {self.exact_part.max_abs_error:.2g})")
        return result

    def explain(self, result: VerificationResult) -> str:
        pruned = [g for g in self.dg.groups if any(s.of(self.dropped).any() for s in g.spaces)]
        groups = ", ".join(f"{g.id} ({g.spaces[0]})" for g in pruned[:5])
        return (f"pruning broke the model: {result.message}. Groups pruned include {groups}. Your model was left "
                f"unchanged; please report this with the model definition (verify=False skips the check).")
