"""Verification one block at a time: each pruned block against the original block with its removed
channels zeroed (and, with bias compensation, their mean contribution added), on the hidden states
that enter that block in the original model.

A wrong rule shows here as it does in whole-model verification: the pruned block computes something
the zeroed original does not. Both run in IEEE fp32 whatever the checkpoint's dtype
(:mod:`structprune.precision`), so rounding stays far below the size of a mistake.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..precision import RTOL, cast_floats, computing_in, ieee_fp32
from ..verify import VerificationResult
from .layer_loop import BlockCall


def _run(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    floats = BlockCall(cast_floats(call.args, torch.float32), cast_floats(call.kwargs, torch.float32), call.positional)
    with torch.no_grad(), ieee_fp32(), computing_in(block, torch.float32):
        return floats.run(block, hidden.float())


def check_block(index: int, reference: nn.Module, pruned: nn.Module, call: BlockCall, hidden: torch.Tensor,
                keep: Optional[torch.Tensor], exact: bool, rtol: float = RTOL) -> VerificationResult:
    """Compare block ``index``: ``pruned`` on the kept hidden channels (``keep``; None: all) with ``reference``
    (the zeroed original) on all of them, at the kept channels of its output."""
    where = f"block {index}"
    if keep is not None:
        keep = keep.to(hidden.device)
        hidden = hidden * torch.zeros(hidden.shape[-1], dtype=hidden.dtype, device=hidden.device).index_fill_(
            0, keep, 1)  # the removed hidden channels read zero in the reference too
    expected = _run(reference, call, hidden)
    try:
        got = _run(pruned, call, hidden if keep is None else hidden.index_select(-1, keep))
    except Exception as error:
        return VerificationResult(False, exact, float("inf"),
                                  f"{where}: the pruned block failed to run: {type(error).__name__}: {error}")
    if keep is not None:
        expected = expected.index_select(-1, keep)
    if got.shape != expected.shape:
        return VerificationResult(False, exact, float("inf"),
                                  f"{where}: output shape {tuple(got.shape)} instead of {tuple(expected.shape)}")
    if not torch.isfinite(got).all() and torch.isfinite(expected).all():
        return VerificationResult(False, exact, float("inf"), f"{where}: the pruned block gives non-finite values")
    if not exact:
        return VerificationResult(True, False, 0.0, f"{where}: shapes and finite values (a channel-mixing op "
                                                    f"on a pruned axis makes an exact comparison impossible)")
    scale = expected.abs().max().item()
    difference = (expected - got).abs().max().item()
    relative = difference / max(scale, 1e-12)
    if difference > rtol * max(scale, 1e-6) + 1e-6:
        return VerificationResult(False, True, relative, f"{where} differs from the zeroed original block by "
                                                         f"{difference:.3g} (largest reference magnitude {scale:.3g})")
    return VerificationResult(True, True, relative, f"{where} matches the zeroed original block")


__all__ = ["check_block"]
