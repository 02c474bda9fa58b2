"""Widths the hardware runs well: what ``round_to="auto"`` rounds every pruned layer to.

A layer's latency is a staircase in its width, not a line: GPU tensor cores work on tiles of 8 to
64 channels (NVIDIA's guidance: multiples of 8 for fp16/bf16, ideally 64 to 256), and a CPU's
vector units and oneDNN's blocked layouts on 16 fp32 (32 bf16) lanes. A width just off a multiple
pays for the whole next tile, which is how an unrounded 30% prune ends up slower than the dense
model on a GPU. So ``"auto"`` keeps every pruned width a multiple of a power of two:

- at most the device's *grain* (:data:`GRAIN_BYTES` over the element size, capped at 64 channels);
- never more than the original width's own power-of-two factor: a width of 576 keeps multiples of
  64, one of 40 multiples of 8, so rounding never makes a layer less aligned than it was;
- at most an eighth of the width, so that small layers can still lose channels in small steps;
- layers narrower than :data:`MIN_ALIGNED_WIDTH` are not rounded: their speed is launch-bound.

Register another device type's grain in :data:`GRAIN_BYTES`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

MIN_ALIGNED_WIDTH = 32
MAX_ALIGNMENT = 64
# bytes of one channel tile: 128 B = 64 bf16 channels on a GPU's tensor cores; 64 B = one AVX-512 register on a CPU
GRAIN_BYTES: Dict[str, int] = {"cuda": 128, "cpu": 64}
DEFAULT_GRAIN_BYTES = 128  # meta and other devices: plan for the GPU, the strictest common case


def alignment(width: int, device: torch.device, dtype: torch.dtype) -> int:
    """The channel multiple ``round_to="auto"`` keeps for a layer of ``width`` channels (1: no rounding)."""
    if width < MIN_ALIGNED_WIDTH:
        return 1
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype.is_floating_point else 4
    grain = min(MAX_ALIGNMENT, GRAIN_BYTES.get(device.type, DEFAULT_GRAIN_BYTES) // itemsize)
    own = width & -width  # the largest power of two dividing the width
    step = 1
    while step * 2 <= min(grain, own, width // 8):
        step *= 2
    return step


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """The device and floating dtype the model computes in: those of its first floating parameter or
    buffer (CPU and float32 for a model without any)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


__all__ = ["DEFAULT_GRAIN_BYTES", "GRAIN_BYTES", "MAX_ALIGNMENT", "MIN_ALIGNED_WIDTH", "alignment",
           "model_device_dtype"]
