"""Verification: the pruned model must reproduce the original with the dropped channels zeroed.

:class:`ZeroingInterpreter` runs the original captured graph and zeroes the dropped channels in every
tensor whose axes carry them. Where every op on the pruned axes is per-channel, the pruned model
must match that reference to float tolerance; where an op mixes channels (LayerNorm or softmax over
a pruned axis) only shapes and finiteness can be checked, and the result says so.

With bias compensation (:mod:`structprune.surgery.compensation`) a compensated layer's removed inputs
still contribute their calibration mean: the reference adds that contribution to the layer's output,
so the pruned model is compared with exactly what the compensation promises.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, cast

import numpy as np
import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from .errors import VerificationError
from .graph.capture import eval_mode, output_tensors
from .graph.dependency_graph import DependencyGraph
from .graph.interpreter import GraphInterpreter
from .graph.labels import Label
from .precision import LOW_PRECISION, RTOL, cast_floats, compute_dtype, computing_in, ieee_fp32, native_tolerance
from .surgery.compensation import Compensation
from .surgery.shrink import shrunk_copy


@dataclass
class VerificationResult:
    """The verdict of comparing a pruned model with the original whose dropped channels are zeroed.

    Attributes:
        passed: the pruned model reproduced the zeroed original (within float tolerance when ``exact``).
        exact: values were compared; False where an op mixes channels over a pruned axis (LayerNorm,
            softmax), so only the output shapes and finiteness could be checked.
        max_relative_error: the largest output difference divided by the largest reference magnitude
            (0.0 when values were not compared; inf when the pruned model failed to run or its outputs
            differ in number, shape, integer values or finiteness).
        message: what was found, in words (also what ``str()`` gives).
    """

    passed: bool
    exact: bool  # True: values compared; False: shapes and finiteness only
    max_relative_error: float
    message: str

    def __str__(self) -> str:
        return self.message

    @property
    def max_abs_error(self) -> float:
        """Deprecated name of :attr:`max_relative_error` (it always held the relative error)."""
        warnings.warn("VerificationResult.max_abs_error is deprecated: it is a relative error, read "
                      "max_relative_error", DeprecationWarning, stacklevel=2)
        return self.max_relative_error


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


class ZeroingInterpreter(GraphInterpreter):
    """Run the captured original graph, zeroing every dropped channel in every labelled tensor.

    ``shifts`` (node -> output axis, values) adds a compensated layer's lost mean contribution to its output.

    With ``dtype`` (the precision verification computes in), the fp16/bf16 literals a trace recorded
    (``x.to(torch.bfloat16)`` from a forward that read ``self.dtype``) cast to ``dtype`` instead."""

    def __init__(self, module: nn.Module, graph: fx.Graph, labels: Dict[fx.Node, Label], dropped: np.ndarray,
                 dtype: Optional[torch.dtype] = None, shifts: Optional[Dict[fx.Node, Tuple[int, torch.Tensor]]] = None):
        super().__init__(module, graph=graph)
        self._labels = labels
        self._dropped = dropped
        self._dtype = dtype
        self._shifts = shifts or {}

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> Tuple[Tuple, Dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if self._dtype is None:
            return args, kwargs
        return cast(Tuple[Tuple, Dict[str, Any]], tree_map(self._promoted, (args, kwargs)))

    def _promoted(self, value: Any) -> Any:
        return self._dtype if isinstance(value, torch.dtype) and value in LOW_PRECISION else value

    def run_node(self, n: fx.Node) -> Any:
        # zero after every node, not only after the producing layer: a BatchNorm shift or a bias would make a
        # dropped channel non-zero again, and the next layer would read what the pruned model no longer has
        value = super().run_node(n)
        shift = self._shifts.get(n)
        if shift is not None and isinstance(value, torch.Tensor):
            # a compensated layer: its removed inputs still contribute their mean, through its bias
            axis, delta = shift
            shape = [1] * value.dim()
            shape[axis] = -1
            value = value + delta.to(value.device, value.dtype).reshape(shape)
        return _zero_dropped(value, self._labels.get(n), self._dropped)


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


def zeroed_reference(dg: DependencyGraph, dropped: np.ndarray, dtype: Optional[torch.dtype] = None,
                     compensation: Optional[Compensation] = None) -> Any:
    """Outputs of the original model with every dropped channel zeroed (run before shrinking, since an
    in-place shrink changes the very modules the captured graph calls), computed in ``dtype`` (None: the
    model's own) with full-precision fp32 arithmetic (see :mod:`structprune.precision`). With
    ``compensation``, the layers whose biases absorb the removed channels read them at those constants."""
    shifts = compensation.shifts(dg, dropped) if compensation is not None else None
    with torch.no_grad(), eval_mode(dg.model), ieee_fp32(), computing_in(dg.model, dtype), \
            _zeroed_leaf_parameters(dg, dropped):
        return ZeroingInterpreter(dg.trace.module, dg.trace.graph, dg.labels, dropped, dtype, shifts).run(
            *cast_floats(dg.trace.run_args(dg.inputs), dtype))


def computes_alike(dg: DependencyGraph, dtype: torch.dtype) -> bool:
    """Do the model's own forward and its captured graph agree when both compute in ``dtype``? Not when the
    forward pins a dtype the graph's promotion cannot reach (``x.half()`` inside ``forward``)."""
    nothing = np.zeros(dg.n_elements, bool)
    inputs = dg.inputs.cloned()
    try:
        traced = output_tensors(zeroed_reference(dg, nothing, dtype))
        with torch.no_grad(), eval_mode(dg.model), ieee_fp32(), computing_in(dg.model, dtype):
            eager = output_tensors(dg.model(*cast_floats(inputs.args, dtype), **cast_floats(inputs.kwargs, dtype)))
    except Exception:  # e.g. a bf16 activation meeting an fp32 weight: the model cannot run in fp32
        return False
    return len(traced) == len(eager) and all(
        a.shape == b.shape and a.dtype == b.dtype and
        (not a.is_floating_point() or (a - b).abs().max().item() <= RTOL * max(a.abs().max().item(), 1e-6) + 1e-6)
        for a, b in zip(traced, eager) if a.numel())


def is_exact(dg: DependencyGraph, dropped: np.ndarray) -> bool:
    """Can values be compared? Only if every group that loses channels has only per-channel ops."""
    return not (dropped & ~dg.exact_elements).any()


def verify(dg: DependencyGraph, pruned: nn.Module, dropped: np.ndarray, reference: Any = None,
           exact: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
           rtol: Optional[float] = None) -> VerificationResult:
    """Compare ``pruned`` on the example input with the zeroed original (``reference`` if precomputed, in
    the same ``dtype``), to ``rtol`` of the largest reference magnitude (default :data:`RTOL`)."""
    # fresh inputs: an in-place op in the pruned forward must not alter the example input used again later
    inputs = dg.inputs.cloned()
    rtol = RTOL if rtol is None else rtol
    if exact is None:
        exact = is_exact(dg, dropped)
    if reference is None:
        reference = zeroed_reference(dg, dropped, dtype)
    with torch.no_grad(), eval_mode(pruned), ieee_fp32(), computing_in(pruned, dtype):
        try:
            result = pruned(*cast_floats(inputs.args, dtype), **cast_floats(inputs.kwargs, dtype))
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
            if err > rtol * max(scale, 1e-6) + 1e-6:
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

    def __init__(self, dg: DependencyGraph, dropped: np.ndarray, compensation: Optional[Compensation] = None):
        self.dg, self.dropped = dg, dropped
        self.exact_part: Optional[VerificationResult] = None
        # fp16/bf16 models are compared in fp32 (see structprune.precision); one whose graph pins its dtype
        # cannot be, and is compared in its own dtype at that dtype's tolerance
        self.dtype, self.rtol = compute_dtype(dg.model), RTOL
        if self.dtype is not None and not computes_alike(dg, self.dtype):
            self.dtype, self.rtol = None, native_tolerance(dg.model)
        self.reference = zeroed_reference(dg, dropped, self.dtype, compensation)
        # dropping only the channels whose groups see per-channel ops gives a model that must match exactly
        subset = dropped & dg.exact_elements
        if not is_exact(dg, dropped) and subset.any():
            part = shrunk_copy(dg.model, dg, subset)
            if compensation is not None:
                compensation.fold(part, compensation.deltas(dg, subset))
            self.exact_part = verify(dg, part, subset, zeroed_reference(dg, subset, self.dtype, compensation),
                                     exact=True, dtype=self.dtype, rtol=self.rtol)
            if not self.exact_part.passed:
                raise VerificationError(self.explain(self.exact_part))

    def check(self, pruned: nn.Module) -> VerificationResult:
        """The verdict on ``pruned``; raises :class:`VerificationError` when it fails."""
        result = verify(self.dg, pruned, self.dropped, self.reference, dtype=self.dtype, rtol=self.rtol)
        if not result.passed:
            raise VerificationError(self.explain(result))
        if self.exact_part is not None:
            result.message += (f"; the channels outside channel-mixing ops, pruned alone, match the zeroed "
                               f"original exactly (relative error {self.exact_part.max_relative_error:.2g})")
        return result

    def explain(self, result: VerificationResult) -> str:
        pruned = [g for g in self.dg.groups if any(s.of(self.dropped).any() for s in g.spaces)]
        groups = ", ".join(f"{g.id} ({g.spaces[0]})" for g in pruned[:5])
        return (f"pruning broke the model: {result.message}. Groups pruned include {groups}. Your model was left "
                f"unchanged; please report this with the model definition (verify=False skips the check).")
