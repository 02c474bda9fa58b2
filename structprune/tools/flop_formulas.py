"""FLOP formulas for the fused attention kernels ``torch.utils.flop_counter`` does not know.

FlopCounterMode counts an op only if it has a formula, and silently counts zero otherwise. On a
CPU, ``F.scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu``, and
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode take PyTorch's fast path
(``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``): none has a formula, so the
attention of a LLaMA or a ViT was missing from :func:`~structprune.tools.metrics.count_macs` on a
CPU while the same model on the meta device (where attention decomposes into ``bmm``) had it. A MACs
target planned on one and checked on the other then missed by the attention's share.

Each formula receives the op's raw arguments (tensors, not shapes: nested tensors of the encoder
fast path have no single shape) and returns FLOPs (2 per multiply-accumulate), as torch's own do.
Register another op with :func:`register_flop_formula`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.utils.flop_counter import sdpa_flop_count

aten = torch.ops.aten
FlopFormula = Callable[..., int]
FLOP_FORMULAS: Dict[Any, FlopFormula] = {}


def register_flop_formula(*ops: Any) -> Callable[[FlopFormula], FlopFormula]:
    """Decorator: count ``ops`` (aten op packets) with the decorated formula, which gets the op's raw
    arguments and returns FLOPs."""

    def register(formula: FlopFormula) -> FlopFormula:
        formula._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode: pass tensors, not shapes
        for op in ops:
            FLOP_FORMULAS[op] = formula
        return formula

    return register


def _sequences(x: torch.Tensor) -> List[Tuple[int, int]]:
    """(length, width) of every sequence in a batch-first ``(B, L, E)`` tensor, or a nested tensor of
    ``(L_i, E)`` sequences."""
    if x.is_nested:
        return [(int(s.shape[0]), int(s.shape[-1])) for s in x.unbind()]
    return [(int(x.shape[-2]), int(x.shape[-1]))] * (x.numel() // max(x.shape[-2] * x.shape[-1], 1))


def _attention_macs(query: torch.Tensor, key: torch.Tensor) -> int:
    """Multiply-accumulates of multi-head attention with its in- and out-projections (heads do not
    change the count): q, k, v and out projections plus the score and weighted-sum matmuls."""
    macs = 0
    for (lq, e), (lk, _) in zip(_sequences(query), _sequences(key)):
        macs += 2 * lq * e * e + 2 * lk * e * e + 2 * lq * lk * e
    return macs


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


@register_flop_formula(aten._native_multi_head_attention)
def _fused_multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                                **kwargs: Any) -> int:
    return 2 * _attention_macs(query, key)


@register_flop_formula(aten._transformer_encoder_layer_fwd)
def _fused_encoder_layer(src: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    ffn_weight_1 = args[13] if len(args) > 13 else kwargs["ffn_weight_1"]
    feed_forward = sum(2 * length * width * int(ffn_weight_1.shape[0]) for length, width in _sequences(src))
    return 2 * (_attention_macs(src, src) + feed_forward)


__all__ = ["FLOP_FORMULAS", "register_flop_formula"]
