"""Checks of the example input that turn a framework error deep in the pipeline into a clear one up front.

* :func:`check_input_dtype`: a half-precision input into an fp32 model (or the reverse) fails only when
  the model first runs for real, late (in verification) and as PyTorch's ``Input type (c10::Half) and
  bias type (float) should be the same``;
* :func:`check_has_samples`: an empty batch traces and "verifies", but verification then compares
  nothing, so its verdict would be meaningless.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

from ..errors import ExampleInputError
from .capture import Inputs, eval_mode


def input_tensors(inputs: Inputs) -> List[Tuple[str, torch.Tensor]]:
    """Every tensor of the example input with a name to show: ``argument 0``, ``'input_ids'``, ``argument 1[2]``."""
    found: List[Tuple[str, torch.Tensor]] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            found.append((name, value))
        elif isinstance(value, (list, tuple)):
            for k, item in enumerate(value):
                visit(f"{name}[{k}]", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}[{key!r}]", item)

    for position, arg in enumerate(inputs.args):
        visit(f"argument {position}", arg)
    for key, kwarg in inputs.kwargs.items():
        visit(repr(key), kwarg)
    return found


def _weight_dtype(model: nn.Module) -> Any:
    """The floating dtype of the model's first floating parameter (None: it has none, or they are on meta)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return None if tensor.is_meta else tensor.dtype
    return None


def check_input_dtype(model: nn.Module, inputs: Inputs) -> None:
    """Raise :class:`ExampleInputError` when a floating example input has another dtype than the model's
    weights *and* the model fails on it. A model that casts its own input (``x.to(self.weight.dtype)``)
    is fine, so a mismatch is only an error once one eval-mode forward, run here, confirms it."""
    weights = _weight_dtype(model)
    odd = [(name, t.dtype) for name, t in input_tensors(inputs) if t.is_floating_point() and t.dtype != weights]
    if weights is None or not odd:
        return
    try:
        fresh = inputs.cloned()
        with eval_mode(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*fresh.args, **fresh.kwargs)
    except Exception as error:
        name, dtype = odd[0]
        raise ExampleInputError(
            f"the example input {name} is {dtype} but the model's weights are {weights}, and the model fails on "
            f"it ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]}). Pass an input of the "
            f"model's dtype (x.to({weights})), or convert the model first (model.to({dtype})) and prune that: "
            f"the pruned model keeps the dtype it was given.") from error


def check_has_samples(inputs: Inputs) -> None:
    """Raise :class:`ExampleInputError` when a tensor of the example input is empty (a batch of 0): the
    verification compares the pruned model with the original on this input, and on nothing it proves nothing."""
    for name, tensor in input_tensors(inputs):
        if tensor.numel() == 0:
            sample = (1, *tensor.shape[1:]) if tensor.ndim else (1,)
            raise ExampleInputError(
                f"the example input {name} is empty (shape {tuple(tensor.shape)}): verification compares the pruned "
                f"model with the original on the example input, and an empty batch compares nothing. Pass at "
                f"least one sample (real data, or e.g. torch.randn{sample}), or verify=False to skip verification.")


__all__ = ["check_has_samples", "check_input_dtype", "input_tensors"]
