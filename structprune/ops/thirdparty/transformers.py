"""Hugging Face ``transformers`` layers, registered by class name so the library need not be installed.

GPT-2's ``Conv1D`` is a linear layer whose weight is stored transposed, (in, out), and whose forward
is ``addmm(bias, x, weight)`` reshaped with ``self.nf``: the ``addmm`` rule (``contraction.py``)
couples it; here it gets its updater and the axis of its weight that reads the input.
"""
from __future__ import annotations

from typing import Dict, Protocol

import torch

from ..registry import register_op

CONV1D = "transformers.pytorch_utils.Conv1D"


class _Conv1D(Protocol):
    """What the updater uses of ``transformers.pytorch_utils.Conv1D`` (not imported: it may be absent)."""

    nx: int
    nf: int
    weight: torch.Tensor


def update_conv1d(module: _Conv1D, old: Dict[str, tuple]) -> None:
    """``nx``/``nf`` (input/output width) follow the sliced (in, out) weight."""
    module.nx, module.nf = module.weight.shape


register_op(CONV1D, update=update_conv1d, input_axes={"weight": 0})
