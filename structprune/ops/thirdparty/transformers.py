"""Hugging Face ``transformers`` layers, registered by class name so the library need not be installed.

GPT-2's ``Conv1D`` is a linear layer whose weight is stored transposed, (in, out), and whose forward
is ``addmm(bias, x, weight)`` reshaped with ``self.nf``: the ``addmm`` rule (``contraction.py``)
couples it; here it gets its updater and the axis of its weight that reads the input.
"""
from __future__ import annotations

from typing import Dict, Protocol

import torch

from ...graph.labels import ChannelState
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


# buffer -> the buffer it copies: Hugging Face rotary embeddings keep ``original_inv_freq``, which dynamic
# RoPE variants copy back into ``inv_freq``; pruned head dims must drop the same frequencies from both
MIRRORED_BUFFERS = {"original_inv_freq": "inv_freq"}


def tie_mirrored_buffers(state: ChannelState, tensors: Dict[str, torch.Tensor], canonical: Dict[int, str]) -> None:
    """Couple every buffer of :data:`MIRRORED_BUFFERS` element by element to the buffer it copies."""
    for name, copy in tensors.items():
        owner, _, attribute = name.rpartition(".")
        source_name = MIRRORED_BUFFERS.get(attribute)
        source = tensors.get(f"{owner}.{source_name}" if owner else str(source_name)) if source_name else None
        if source is None or source is copy or source.shape != copy.shape or copy.ndim != 1 or len(copy) < 2:
            continue
        size = len(copy)
        state.unify(state.param_axis(canonical[id(source)], 0, size), state.param_axis(canonical[id(copy)], 0, size),
                    f"{name} copies {source_name}", size)
