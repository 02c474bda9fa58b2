"""``nn.Linear`` and ``F.linear``: the last axis is contracted with a weight (matmul and einsum live in
``contraction.py``, embeddings in ``embedding.py``)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.labels import AxisLabel
from .context import RuleContext
from .registry import register_op, rule


def linear(ctx: RuleContext, x, w_out: AxisLabel, w_in: AxisLabel, bias: AxisLabel):
    """y = x @ W^T + b: x's last axis is consumed by W's dim 1; y's last axis is W's dim 0."""
    x_label = ctx.tlabel(x)
    if not x_label:
        ctx.freeze_inputs("linear on a 0-d input")
        return ctx.unlabeled_output()
    ctx.unify(x_label[-1], w_in, ctx.meta(x).shape[-1])
    ctx.attach(bias, w_out)
    ctx.mark_producer(w_out)
    return tuple(x_label[:-1]) + (w_out,)


@rule(nn.Linear)
def linear_module(ctx: RuleContext, node):
    return linear(ctx, ctx.arg(0, "input"), ctx.module_param("weight", 0), ctx.module_param("weight", 1),
                  ctx.module_param("bias", 0))


@rule(F.linear, "aten.linear")
def linear_function(ctx: RuleContext, node):
    w = ctx.tlabel(ctx.arg(1, "weight"))
    b = ctx.tlabel(ctx.arg(2, "bias"))
    if len(w) != 2:
        ctx.freeze_inputs("linear with a weight that is not 2-D")
        return ctx.unlabeled_output()
    return linear(ctx, ctx.arg(0, "input"), w[0], w[1], b[0] if b else None)


def linear_shape(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Output of a linear layer on the meta device."""
    if x.ndim == 0 or x.shape[-1] != module.in_features:
        raise RuntimeError("linear layer does not fit its input")  # the real op raises the real error
    return x.new_empty(x.shape[:-1] + (module.out_features,))


def update_linear(module: nn.Linear, old: Dict[str, tuple]) -> None:
    module.out_features, module.in_features = module.weight.shape


# the weight is (out, in): dim 1 reads the input features
register_op(nn.Linear, shape=linear_shape, update=update_linear, width="out_features", input_axes={"weight": 1},
            weighted=True)
