"""Widths a Hugging Face config can describe: limits the planner keeps so that the pruned model reloads.

LLaMA's config (and the configs built like it) refuses, on save and on load, a hidden size that is not a
multiple of ``num_attention_heads``. Keeping the hidden size, 28 of Llama-3-8B's 32 heads cannot be saved,
while 16 can; :class:`HeadCounts` finds the nearest head count the config accepts by asking the config
itself (its ``validate``), so each model family's own rule applies and no rule is copied here.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

from torch import nn


class HeadCounts:
    """Which numbers of query heads ``model``'s config accepts (every number when it has no validation)."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None) if callable(getattr(model, "save_pretrained", None)) else None
        heads = getattr(config, "num_attention_heads", None)
        self.config = config if isinstance(heads, int) and heads > 0 and callable(getattr(config, "validate", None)) \
            else None
        self.heads: int = heads if self.config is not None and isinstance(heads, int) else 0
        explicit, hidden = getattr(config, "head_dim", None), getattr(config, "hidden_size", None)
        self.head_dim: int = explicit if isinstance(explicit, int) and explicit > 0 else \
            (hidden // self.heads if isinstance(hidden, int) and self.heads else 0)
        self._accepted: Dict[int, bool] = {}

    def nearest(self, width: int, channels_per_unit: int, keep: int) -> int:
        """For a layer of ``width`` units of ``channels_per_unit`` channels each: ``keep``, or the nearest count of
        units whose query heads the config accepts (ties keep more). Other layers than the query projection the
        config's head count describes are returned ``keep`` as they are."""
        if not self.head_dim or channels_per_unit % self.head_dim:
            return keep
        slices = channels_per_unit // self.head_dim  # head-sized slices per unit
        fused = width * slices // self.heads  # 1: a query projection; 3: query, key and value in one (GPT-NeoX)
        if not fused or width * slices != fused * self.heads or slices % fused:
            return keep  # not the projection of the heads the config counts
        per_unit = slices // fused
        by_distance = sorted(range(1, width + 1), key=lambda k: (abs(k - keep), -k))
        return next((k for k in by_distance if self.accepts(k * per_unit)), width)

    def accepts(self, heads: int) -> bool:
        """Does the config validate with ``num_attention_heads = heads``?"""
        if heads not in self._accepted:
            trial: Any = copy.copy(self.config)
            trial.num_attention_heads = heads
            try:
                trial.validate()
                self._accepted[heads] = True
            except Exception:  # transformers raises its own validation errors (and ValueError) for a refused config
                self._accepted[heads] = False
        return self._accepted[heads]


__all__ = ["HeadCounts"]
