"""The names tensors have in a checkpoint, which need not be the model's own.

transformers 5 renames some checkpoint keys when it loads them (GPT-NeoX stores its head as
``embed_out``, the model calls it ``lm_head``; old checkpoints say ``LayerNorm.gamma``) and renames
them back when it saves. :class:`KeyNames` asks transformers for those renamings
(``get_model_conversion_mapping``, ``rename_source_key``), so the checkpoint is read under the names
``from_pretrained`` reads and the pruned folder is written under the names ``save_pretrained`` writes.
Conversions that are more than renamings (separate expert weights fused into one tensor on load) are
refused: a layer's tensors could no longer be read one by one.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, cast

from torch import nn

from ..errors import StructPruneError
from .checkpoint import Checkpoint


class KeyNames:
    """Model key <-> checkpoint key for ``model`` (built from the checkpoint's config) and ``checkpoint``."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint):
        self.to_model: Dict[str, str] = {}
        renamings, converters = _transforms(model, legacy=True)
        meta_state = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        converted: List[str] = []
        for key in checkpoint.keys():
            renamed, converter = _rename(key, renamings, converters, prefix, meta_state)
            if converter is not None:
                converted.append(key)
            self.to_model[key] = renamed
        if converted:
            raise StructPruneError(
                f"transformers converts tensors of this checkpoint on load beyond renaming them ({converted[:3]}: "
                f"separate weights fused into one, as mixture-of-experts checkpoints store their experts); "
                f"layer-by-layer pruning reads tensors one by one and cannot do that yet. Load the model with "
                f"from_pretrained and prune it with slim")
        self.stored: Dict[str, str] = {model_key: key for key, model_key in self.to_model.items()}
        self._saving, _ = _transforms(model, legacy=False, reverse=True)

    def in_checkpoint(self, model_key: str) -> Optional[str]:
        """The checkpoint key holding the model's tensor ``model_key`` (None: not stored)."""
        return self.stored.get(model_key)

    def saved(self, model_key: str) -> str:
        """The key ``save_pretrained`` writes the model's tensor ``model_key`` under."""
        return _rename(model_key, self._saving, [], None, None)[0] if self._saving else model_key


def _transforms(model: nn.Module, legacy: bool, reverse: bool = False) -> "tuple[list, list]":
    """transformers' renamings and converters for ``model`` (reversed: those that save)."""
    try:
        from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_model_conversion_mapping
    except ImportError:  # an older transformers renames nothing
        return [], []
    transforms = get_model_conversion_mapping(cast(Any, model), add_legacy=legacy)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if reverse:
        return [t.reverse_transform() for t in renamings], []
    return renamings, converters


def _rename(key: str, renamings: list, converters: list, prefix: Optional[str], meta_state: Any) -> "tuple[str, Any]":
    from transformers.core_model_loading import rename_source_key
    return rename_source_key(key, renamings, converters, prefix, meta_state)


__all__ = ["KeyNames"]
