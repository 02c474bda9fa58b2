"""Rules for functions that model zoos hide from fx with ``torch.fx.wrap``.

Each entry names its reason. Registered only when the library that defines the function is
installed; structprune never requires it.
"""
from __future__ import annotations

import importlib

from .context import RuleContext
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


# torchvision's LayerNorm2d (ConvNeXt) normalises a channels-first map over its channel axis with
# F.layer_norm(x.permute(...), self.normalized_shape, ...): as a leaf module its width follows its
# weight (the LayerNorm updater refreshes normalized_shape), so the channels stay prunable.
_LayerNorm2d = _optional("torchvision.models.convnext", "LayerNorm2d")
if _LayerNorm2d is not None:

    @rule(_LayerNorm2d)
    def layer_norm_2d(ctx: RuleContext, node):
        label = ctx.tlabel(ctx.arg(0))
        size = ctx.meta(ctx.arg(0)).shape[1]
        ctx.attach(ctx.module_param("weight", 0), label[1], size)
        ctx.attach(ctx.module_param("bias", 0), label[1], size)
        if ctx.module.weight is None:
            ctx.freeze(label[1], "LayerNorm2d without affine parameters")
        ctx.state.mark_inexact(label[1], "LayerNorm statistics span the pruned channels")
        return label
