"""Bias compensation: what a removed input channel contributed on average is folded into a bias.

When a layer loses input channel ``j``, its output loses ``W[:, j] * x_j``. Replacing ``x_j`` by its
mean over the calibration data instead of by zero is the best constant in the least-squares sense,
and it is free at run time: ``W[:, j] * mean(x_j)`` is a constant added to the layer's bias (FLAP,
An et al. 2024). A layer without a bias gets one, and where a Hugging Face config decides whether
the layer has a bias (``mlp_bias``, ``attention_bias``), the flag is set and the sibling layers it
governs get zero biases, so that ``save_pretrained``/``from_pretrained`` rebuild the same model.

Without calibration data the same fold runs for the channels that are constant whatever the input
(:func:`constant_channels`: dead channels whose activation of a bias is not zero), which makes
removing them exact.

The fold is exact only for layers that are affine in each input position: linear layers (and GPT-2's
``Conv1D``) and convolutions that add no padding (a zero-padded border does not see the constant).
Other readers keep zero for the removed channel, and verification compares the pruned model with
the original in which each compensated layer reads the constant (:meth:`Compensation.shifts`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import fx, nn

from ..graph.attributes import attribute_at
from ..graph.dependency_graph import DependencyGraph, canonical_names
from ..ops.registry import input_axis
from ..scoring.activations import ActivationCollector, InputStatistics, per_weight_column

# Hugging Face module classes whose config decides which of their linear layers have a bias
CONFIG_BIAS_FLAGS: Dict[str, Tuple[str, Tuple[str, ...]]] = {}


def register_bias_flag(class_name: str, flag: str, layers: Tuple[str, ...]) -> None:
    """Declare that ``config.<flag>`` of modules of class ``class_name`` (by ``__name__``, subclasses
    included) switches the bias of their child layers ``layers`` on and off together."""
    CONFIG_BIAS_FLAGS[class_name] = (flag, layers)


register_bias_flag("LlamaMLP", "mlp_bias", ("gate_proj", "up_proj", "down_proj"))
register_bias_flag("LlamaAttention", "attention_bias", ("q_proj", "k_proj", "v_proj", "o_proj"))


def _affine_per_position(module: nn.Module) -> bool:
    """Does a constant input channel add a constant to every output position?"""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:  # a grouped conv loses the outputs of the inputs it loses: nothing to carry
            return False
        if module.padding == "same":
            return all(k == 1 for k in module.kernel_size)
        return module.padding == "valid" or all(p == 0 for p in module.padding)
    return input_axis(module, "weight") is not None


LINEAR_FUNCTIONS = {torch.nn.functional.linear, torch.ops.aten.linear.default}  # (x, weight, bias) calls


@dataclass
class Compensation:
    """Per input-reading weight (canonical name): the mean of every input feature it reads, the graph nodes
    that read it as a layer (with the feature axis of their input), and the layers owning it (module paths)."""

    means: Dict[str, torch.Tensor]
    statistics: Dict[str, InputStatistics]
    readers: Dict[str, List[Tuple[fx.Node, int]]]
    owners: Dict[str, List[str]]

    @classmethod
    def from_statistics(cls, dg: DependencyGraph, statistics: Dict[str, InputStatistics]) -> "Compensation":
        """The weights that every graph node reading them uses as an affine layer: a call of a linear layer
        or an unpadded convolution (``call_module``, or ``F.linear`` where the graph inlined the module).
        A reader's axis is that of its output features (1 for a convolution, the last for a linear layer)."""
        canonical = canonical_names(dict(dg.model.named_parameters()))
        owners: Dict[str, List[str]] = {}
        for path, module in dg.model.named_modules():
            weight = getattr(module, "weight", None)
            reads_input = input_axis(module, "weight") is not None
            if isinstance(weight, torch.Tensor) and id(weight) in canonical and reads_input:
                owners.setdefault(canonical[id(weight)], []).append(path)
        readers: Dict[str, List[Tuple[fx.Node, int]]] = {}
        blocked = set()
        for node in dg.trace.graph.nodes:
            if node.op == "call_module":
                module = dg.trace.module.get_submodule(str(node.target))
                weight = getattr(module, "weight", None)
                reader: Optional[str] = canonical.get(id(weight)) if isinstance(weight, torch.Tensor) else None
                if reader is None or input_axis(module, "weight") is None:
                    continue
                if _affine_per_position(module):
                    axis = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
                    readers.setdefault(reader, []).append((node, axis))
                else:
                    blocked.add(reader)
            elif node.op == "call_function":
                for read in node.all_input_nodes:
                    read_name = canonical.get(id(attribute_at(dg.trace.module, str(read.target)))) \
                        if read.op == "get_attr" else None
                    if read_name is None:
                        continue
                    if node.target in LINEAR_FUNCTIONS and len(node.args) > 1 and node.args[1] is read:
                        readers.setdefault(read_name, []).append((node, -1))
                    else:
                        blocked.add(read_name)
        keep = [name for name in statistics if name in readers and name in owners and name not in blocked]
        return cls({name: statistics[name].mean for name in keep}, {name: statistics[name] for name in keep},
                   {name: readers[name] for name in keep}, {name: owners[name] for name in keep})

    def constants(self, dg: DependencyGraph, dropped: np.ndarray) -> Dict[str, torch.Tensor]:
        """Per compensated weight, the value each input feature is held at: its mean where ``dropped`` removes
        the feature, zero elsewhere (weights that lose no input are left out)."""
        result = {}
        for space in dg.spaces:
            stats = self.statistics.get(space.tensor)
            if stats is None or space.dim != stats.axis:
                continue
            gone = torch.as_tensor(space.of(dropped), device=self.means[space.tensor].device)
            held = torch.where(gone, self.means[space.tensor], torch.zeros_like(self.means[space.tensor]))
            if held.any():  # removed inputs with a mean of zero need no bias (and get none)
                result[space.tensor] = held
        return result

    def contributions(self, dg: DependencyGraph, dropped: np.ndarray) -> Dict[str, torch.Tensor]:
        """Per compensated weight that loses inputs, the removed inputs' mean contribution to each output
        (``W[:, removed] @ mean[removed]``), from ``dg.model``'s full weights (so before anything is sliced)."""
        result = {}
        with torch.no_grad():
            for name, values in self.constants(dg, dropped).items():
                stats = self.statistics[name]
                weight = _weight_of(dg.model.get_submodule(self.owners[name][0]))
                result[name] = _lost_contribution(weight, stats, values)
        return result

    def shifts(self, dg: DependencyGraph, dropped: np.ndarray) -> Dict[fx.Node, Tuple[int, torch.Tensor]]:
        """For the reference run (where removed inputs read zero weights): per graph node calling a compensated
        layer, the axis of its output features and the contribution to add to its output."""
        return {node: (axis, delta) for name, delta in self.contributions(dg, dropped).items()
                for node, axis in self.readers[name]}

    def deltas(self, dg: DependencyGraph, dropped: np.ndarray) -> Dict[str, torch.Tensor]:
        """Per compensated layer (module path), what to add to its bias in the pruned model: the contribution
        at the outputs the layer keeps."""
        result = {}
        for name, delta in self.contributions(dg, dropped).items():
            out_dim = 1 - self.statistics[name].axis
            for space in dg.spaces:
                if space.tensor == name and space.dim == out_dim and space.of(dropped).any():
                    keep = torch.as_tensor(np.flatnonzero(~space.of(dropped)), device=delta.device)
                    delta = delta.index_select(0, keep)
            for path in self.owners[name]:
                result[path] = delta
        return result

    @staticmethod
    def fold(model: nn.Module, deltas: Dict[str, torch.Tensor], notes: Optional[List[str]] = None) -> None:
        """Add ``deltas`` (from :meth:`deltas`) to the biases of ``model``'s layers, creating biases and setting
        config flags as needed. Biases are replaced, never changed in place: an in-place prune can roll back."""
        for path, delta in deltas.items():
            layer = model.get_submodule(path)
            bias = _bias_of(model, path, layer, notes)
            layer.bias = nn.Parameter((bias.detach().double() + delta.to(bias.device)).to(bias.dtype),
                                      requires_grad=bias.requires_grad)


ROWS_PER_CHUNK = 2048  # float64 copies of a weight are made this many output rows at a time


def _lost_contribution(weight: torch.Tensor, stats: InputStatistics, values: torch.Tensor) -> torch.Tensor:
    """``W @ values`` over the weight's input dim, in float64: per output, what the held input values add.

    A plain matrix is multiplied a block of rows at a time, so no float64 copy of a whole large weight (a
    7B model's down_proj: 470 MB) is ever made; other weights (convolutions, grouped) broadcast the column."""
    out_dim = 1 - stats.axis
    if weight.dim() == 2 and stats.groups == 1:
        held = values.to(weight.device, torch.float32).double()
        rows = weight if out_dim == 0 else weight.t()
        return torch.cat([rows[i:i + ROWS_PER_CHUNK].double() @ held for i in range(0, rows.shape[0], ROWS_PER_CHUNK)])
    column = per_weight_column(stats, weight, values).double()
    return (weight.double() * column).sum([d for d in range(weight.dim()) if d != out_dim])


def _weight_of(layer: nn.Module) -> torch.Tensor:
    weight = getattr(layer, "weight")
    assert isinstance(weight, torch.Tensor)
    return weight.detach()


def _bias_of(model: nn.Module, path: str, layer: nn.Module, notes: Optional[List[str]]) -> torch.Tensor:
    """``layer``'s bias, created (zero) if it has none, with its config flag set where one governs it."""
    bias = getattr(layer, "bias", None)
    if isinstance(bias, torch.Tensor):
        return bias
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    flag = _bias_flag(parent)
    siblings = flag[1] if flag is not None and child in flag[1] else (child,)
    for sibling in siblings:
        target = getattr(parent, sibling, None)
        if isinstance(target, nn.Module) and getattr(target, "bias", None) is None:
            out_dim = 1 - (input_axis(target, "weight") or 0)
            weight = _weight_of(target)
            target.bias = nn.Parameter(torch.zeros(weight.shape[out_dim], dtype=weight.dtype, device=weight.device),
                                       requires_grad=getattr(target, "weight").requires_grad)
    config = getattr(parent, "config", None)
    if flag is not None and child in flag[1] and config is not None:
        setattr(config, flag[0], True)
    elif notes is not None:
        note = (f"{path} got a bias for the removed channels' mean contribution; its model class has no config flag "
                f"for it, so from_pretrained would drop it: save with structprune.save")
        if config is not None and note not in notes:
            notes.append(note)
    created = getattr(layer, "bias")
    assert isinstance(created, torch.Tensor)
    return created


def _bias_flag(parent: nn.Module) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """The config flag (and the child layers it governs) of ``parent``'s class, if one is registered."""
    return next((CONFIG_BIAS_FLAGS[c.__name__] for c in type(parent).__mro__ if c.__name__ in CONFIG_BIAS_FLAGS),
                None)


def config_can_hold_bias(model: nn.Module, path: str) -> bool:
    """Would ``from_pretrained`` rebuild a bias on the layer at ``path`` after compensation gave it one: it has
    one already, or a registered config flag of its parent switches it on."""
    layer = model.get_submodule(path)
    if isinstance(getattr(layer, "bias", None), torch.Tensor):
        return True
    parent_path, _, child = path.rpartition(".")
    flag = _bias_flag(model.get_submodule(parent_path) if parent_path else model)
    return flag is not None and child in flag[1] and getattr(getattr(model, "config", None), flag[0], None) is not None


def constant_channels(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, InputStatistics]:
    """Without calibration data: the input features that are constant whatever the input, with their value.

    A channel whose weights are all zero still carries its activation of the bias: sigmoid(0) = 0.5, or a
    BatchNorm shift whose scale went to zero under Network Slimming. Removing it drops that constant from
    the next layer's output unless the constant goes into the bias. A feature counts as constant when it
    takes one value at every position of the example input and of a random perturbation of it (so an
    all-zero example cannot pass a merely quiet channel for a dead one). Returns the statistics of the
    example, with the mean of every non-constant feature set to zero (nothing is folded for those);
    empty when the example has no floating-point input to perturb."""
    generator = torch.Generator().manual_seed(0)

    def perturbed(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator).to(value.device, value.dtype)
            return value + noise * (value.detach().float().std().nan_to_num(0).item() + 1)
        return value

    floats = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats or any(t.is_meta for t in [*floats, *model.parameters()]):
        return {}  # nothing to perturb, or no values to run on
    try:
        calls = [(args, kwargs), (tuple(perturbed(a) for a in args), {k: perturbed(v) for k, v in kwargs.items()})]
        runs = [ActivationCollector(model).collect([call], run=lambda m, c: m(*c[0], **c[1])) for call in calls]
    except Exception:  # a forward that rejects the perturbed input: fold nothing rather than fail the prune
        return {}
    constant = {}
    for name, first in runs[0].items():
        second = runs[1].get(name)
        if second is None or first.count < 2:
            continue
        steady = first.constant & second.constant & (first.mean == second.mean)
        if steady.any():
            assert first.total is not None
            first.total = torch.where(steady, first.total, torch.zeros_like(first.total))
            constant[name] = first
    return constant


__all__ = ["Compensation", "config_can_hold_bias", "constant_channels", "register_bias_flag"]
