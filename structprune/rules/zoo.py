"""Rules for functions that model zoos hide from fx with ``torch.fx.wrap``.

Each entry names its reason. Registered only when the library that defines the function is
installed; structprune never requires it.
"""
from __future__ import annotations

import importlib

from .elementwise import unary
from .registry import rule


def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# stochastic_depth(input, p, mode, training): identity in eval; in training it scales whole samples
# (mode "row") or the whole batch, never individual channels, so channel labels pass through.
_stochastic_depth = _optional("torchvision.ops.stochastic_depth", "stochastic_depth")
if _stochastic_depth is not None:
    rule(_stochastic_depth)(unary)

