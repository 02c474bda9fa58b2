"""Normalisation layers and per-channel parametric activations.

BatchNorm and InstanceNorm keep per-channel statistics: pruning is exact. GroupNorm is exact too
because whole groups are removed (each group becomes one unit). LayerNorm and RMSNorm (``nn.RMSNorm``,
``F.rms_norm``) over a pruned axis compute statistics across channels, so the pruned model only
approximates the zeroed original.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .context import RuleContext
from .registry import ShapeFunction, register_op, rule

_STATS = ("weight", "bias", "running_mean", "running_var")
M = TypeVar("M", bound=nn.Module)


def _per_channel(ctx: RuleContext, x, cax: int, members) -> tuple:
    label = ctx.tlabel(x)
    size = ctx.meta(x).shape[cax]
    channel = label[cax]
    for member in members:
        ctx.attach(member, channel, size)
    return label


def _norm_module(ctx: RuleContext, x, cax: int) -> tuple:
    members = [ctx.module_param(n, 0) for n in _STATS]
    label = _per_channel(ctx, x, cax, members)
    if all(m is None for m in members) and label[cax] is not None:
        # no tensor records the width (affine=False, no running stats): keep num_features in step
        ctx.record_width(ctx.module_path, "num_features", label[cax])
    return label


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def batch_norm_module(ctx: RuleContext, node):
    return _norm_module(ctx, ctx.arg(0, "input"), 1)


@rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm_module(ctx: RuleContext, node):
    m, x = ctx.module, ctx.arg(0, "input")
    spatial = next(s for cls, s in ((nn.InstanceNorm1d, 1), (nn.InstanceNorm2d, 2), (nn.InstanceNorm3d, 3))
                   if isinstance(m, cls))
    return _norm_module(ctx, x, 1 if ctx.meta(x).ndim == spatial + 2 else 0)


def _input_statistics(ctx: RuleContext, node, x) -> None:
    """Statistics computed from the input itself average over every axis but the channels (and, for
    instance norm, the batch): a label on one of those axes is mixed by them. Weight standardisation
    is ``F.batch_norm(w.reshape(1, out, -1), training=True)``, whose dim 2 is the filters' fan-in."""
    instance = "instance_norm" in str(getattr(node.target, "__name__", node.target))
    # argument 5 is ``training`` (batch norm) or ``use_input_stats`` (instance norm) in every form registered here
    from_input = ctx.arg(5, "use_input_stats" if instance else "training", instance)
    if from_input is False:
        return
    label = ctx.tlabel(x)
    mixed = range(2, len(label)) if instance else [k for k in range(len(label)) if k != 1]
    for k in mixed:
        ctx.mark_inexact(label[k], "normalisation statistics computed over the pruned elements")


def _record_tensorless_width(ctx: RuleContext, members, label) -> None:
    """A norm module's forward inlined into the graph (torch.export) without a tensor that records its width
    (``affine=False``, no running statistics): keep its ``num_features`` in step, as the module rule does."""
    if any(members) or len(label) < 2 or label[1] is None:  # a member label: () for an absent tensor
        return
    if isinstance(ctx.calling_module(), nn.modules.batchnorm._NormBase):
        ctx.record_width(ctx.calling_path(), "num_features", label[1])


@rule(F.batch_norm, F.instance_norm)
def batch_norm_function(ctx: RuleContext, node):  # (input, running_mean, running_var, weight, bias, ...)
    members = [ctx.tlabel(ctx.arg(i, n)) for i, n in ((1, "running_mean"), (2, "running_var"),
                                                        (3, "weight"), (4, "bias"))]
    _input_statistics(ctx, node, ctx.arg(0, "input"))
    label = _per_channel(ctx, ctx.arg(0, "input"), 1, [m[0] if m else None for m in members])
    _record_tensorless_width(ctx, members, label)
    return label


@rule("aten.batch_norm", "aten._native_batch_norm_legit_no_training", "aten.native_batch_norm",
      "aten.instance_norm")
def batch_norm_aten(ctx: RuleContext, node):  # (input, weight, bias, running_mean, running_var, ...)
    members = [ctx.tlabel(ctx.arg(i)) for i in (1, 2, 3, 4)]
    if "no_training" not in str(node.target):
        _input_statistics(ctx, node, ctx.arg(0))
    out = _per_channel(ctx, ctx.arg(0), 1, [m[0] if m else None for m in members])
    _record_tensorless_width(ctx, members, out)
    if isinstance(ctx.out, (tuple, list)):  # native variants also return saved statistics
        return [out] + [None] * (len(ctx.out) - 1)
    return out


def _layer_norm(ctx: RuleContext, x, normalized: int, weight_label, bias_label, frozen: Optional[str] = None,
                kind: str = "LayerNorm"):
    """Normalise over the last ``normalized`` axes; ``frozen`` says why those axes cannot shrink."""
    label = list(ctx.tlabel(x))
    ndim = len(label)
    axes = list(range(ndim - normalized, ndim))
    for k, axis in enumerate(axes):
        if label[axis] is None:
            continue
        if frozen:
            ctx.freeze(label[axis], frozen)
            continue
        # unify even without a weight: with None that freezes the axis, since normalized_shape could not follow
        ctx.unify(label[axis], weight_label[k] if weight_label else None, ctx.meta(x).shape[axis])
        if bias_label:
            ctx.unify(label[axis], bias_label[k], ctx.meta(x).shape[axis])
        ctx.mark_inexact(label[axis], f"{kind} statistics span the pruned channels")
    return tuple(label)


@rule(nn.LayerNorm, nn.RMSNorm)
def layer_norm_module(ctx: RuleContext, node):
    """``nn.LayerNorm`` and ``nn.RMSNorm`` (which has no bias): the same rule over ``normalized_shape``."""
    m = cast("nn.LayerNorm | nn.RMSNorm", ctx.module)
    kind = "RMSNorm" if isinstance(m, nn.RMSNorm) else "LayerNorm"
    k = len(m.normalized_shape)
    w = tuple(ctx.module_param("weight", d) for d in range(k)) if m.weight is not None else None
    b = tuple(ctx.module_param("bias", d) for d in range(k)) if getattr(m, "bias", None) is not None else None
    return _layer_norm(ctx, ctx.arg(0, "input"), k, w, b,
                       None if m.weight is not None else f"{kind} without affine parameters over a channel axis",
                       kind=kind)


def _normalization_function(ctx: RuleContext, owner: type, bias: bool, kind: str, function: str):
    """``F.layer_norm`` / ``F.rms_norm``: ``(input, normalized_shape, weight[, bias], ...)``."""
    shape = ctx.arg(1, "normalized_shape")
    w_node = ctx.arg(2, "weight")
    b_node = ctx.arg(3, "bias") if bias else None
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    # a literal normalized_shape is baked into the code: the normalised axes cannot shrink, unless
    # it is the own attribute of the norm module whose forward makes this call (LayerNorm2d variants)
    dynamic = isinstance(shape, fx.Node) or (isinstance(shape, (list, tuple)) and all(
        isinstance(s, fx.Node) for s in shape))
    own = ctx.own_attribute(w_node, owner, "normalized_shape", tuple(shape)
                            if isinstance(shape, (list, tuple)) else shape)
    w = ctx.tlabel(w_node) if w_node is not None else None
    b = ctx.tlabel(b_node) if b_node is not None else None
    # without a weight no updater would ever rewrite the shape, so even an own attribute would go stale
    frozen = None if (dynamic or own) and w_node is not None else f"{function} with a constant normalized_shape"
    return _layer_norm(ctx, ctx.arg(0, "input"), k, w, b, frozen, kind=kind)


@rule(F.layer_norm, "aten.layer_norm")
def layer_norm_function(ctx: RuleContext, node):
    return _normalization_function(ctx, nn.LayerNorm, bias=True, kind="LayerNorm", function="layer_norm")


@rule(F.rms_norm, "aten.rms_norm")
def rms_norm_function(ctx: RuleContext, node):
    return _normalization_function(ctx, nn.RMSNorm, bias=False, kind="RMSNorm", function="rms_norm")


def _group_norm(ctx: RuleContext, x, groups: int, weight, bias):
    label = ctx.tlabel(x)
    channel = label[1] if len(label) > 1 else None
    size = ctx.meta(x).shape[1]
    if weight is None and channel is not None:  # nothing to slice, so num_groups could not follow
        ctx.freeze(channel, "GroupNorm without affine parameters")
        return label
    if channel is not None:
        # tie every channel of a norm group to its first: whole groups go, so the remaining groups' statistics
        # are unchanged and verification stays exact
        blocks = channel.reshape(groups, -1)
        ctx.unify(np.repeat(blocks[:, :1], blocks.shape[1] - 1, axis=1).ravel(), blocks[:, 1:].ravel())
    ctx.attach(weight, channel, size)
    ctx.attach(bias, channel, size)
    return label


@rule(nn.GroupNorm)
def group_norm_module(ctx: RuleContext, node):
    return _group_norm(ctx, ctx.arg(0, "input"), cast(nn.GroupNorm, ctx.module).num_groups,
                       ctx.module_param("weight", 0), ctx.module_param("bias", 0))


@rule(F.group_norm, "aten.group_norm")
def group_norm_function(ctx: RuleContext, node):
    w_node, b_node = ctx.arg(2, "weight"), ctx.arg(3, "bias")
    groups = ctx.arg(1, "num_groups")
    if w_node is None or not ctx.own_attribute(w_node, nn.GroupNorm, "num_groups", groups):
        ctx.freeze_inputs("group_norm whose group count is not its own GroupNorm's attribute")
        return ctx.unlabeled_output()
    w, b = ctx.tlabel(w_node), ctx.tlabel(b_node) if b_node is not None else None
    return _group_norm(ctx, ctx.arg(0, "input"), groups, w[0], b[0] if b else None)


@rule(nn.PReLU)
def prelu_module(ctx: RuleContext, node):
    x = ctx.arg(0, "input")
    label = ctx.tlabel(x)
    if cast(nn.PReLU, ctx.module).num_parameters > 1:
        cax = 1 if len(label) >= 2 else 0
        ctx.unify(ctx.module_param("weight", 0), label[cax], ctx.meta(x).shape[cax])
    return label


@rule(F.prelu, "aten.prelu", "aten._prelu_kernel")
def prelu_function(ctx: RuleContext, node):
    x = ctx.arg(0, "input")
    label = ctx.tlabel(x)
    weight = ctx.tlabel(ctx.arg(1, "weight"))
    if weight and weight[0] is not None:
        cax = 1 if len(label) >= 2 else 0
        ctx.unify(weight[0], label[cax], ctx.meta(x).shape[cax])
    return label


@rule(nn.LocalResponseNorm)
def local_response_norm(ctx: RuleContext, node):
    label = ctx.tlabel(ctx.arg(0, "input"))
    ctx.mark_inexact(label[1] if len(label) > 1 else None, "LocalResponseNorm mixes neighbouring channels")
    return label


# ---- shapes and metadata ---------------------------------------------------------------------------------
def checked_same_shape(fits: Callable[[M, torch.Tensor], bool]) -> ShapeFunction:
    """A shape function for a layer that keeps its input's shape, once ``fits`` says it accepts it."""

    def shape(module: M, x: torch.Tensor) -> torch.Tensor:
        if not fits(module, x):
            raise RuntimeError(f"{type(module).__name__} does not fit its input")  # the real op explains
        return x

    return shape


def update_norm(module: nn.modules.batchnorm._NormBase, old: Dict[str, tuple]) -> None:
    """BatchNorm / InstanceNorm: ``num_features`` follows the affine weight or the running statistics."""
    kept = module.weight if module.weight is not None else module.running_mean
    if kept is not None:
        module.num_features = kept.shape[0]


def update_layer_norm(module: "nn.LayerNorm | nn.RMSNorm", old: Dict[str, tuple]) -> None:
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


def update_group_norm(module: nn.GroupNorm, old: Dict[str, tuple]) -> None:
    """Whole groups were removed: the group size stays, the group count shrinks."""
    # num_groups still holds the old count here: derive the group size from it before rewriting
    per_group = old["weight"][0] // module.num_groups
    module.num_channels = module.weight.shape[0]
    module.num_groups = module.num_channels // per_group


def update_prelu(module: nn.PReLU, old: Dict[str, tuple]) -> None:
    module.num_parameters = module.weight.numel()


def _layer_norm_fits(m: "nn.LayerNorm | nn.RMSNorm", x: torch.Tensor) -> bool:
    return tuple(x.shape[x.ndim - len(m.normalized_shape):]) == tuple(m.normalized_shape)


def _prelu_fits(m: nn.PReLU, x: torch.Tensor) -> bool:
    return m.num_parameters == 1 or (x.ndim >= 2 and x.shape[1] == m.num_parameters)


register_op(nn.modules.batchnorm._BatchNorm,
            shape=checked_same_shape(lambda m, x: x.ndim >= 2 and x.shape[1] == m.num_features))
register_op(nn.modules.batchnorm._NormBase, update=update_norm, width="num_features")
register_op(nn.LayerNorm, update=update_layer_norm, shape=checked_same_shape(_layer_norm_fits))
register_op(nn.RMSNorm, update=update_layer_norm, shape=checked_same_shape(_layer_norm_fits))
register_op(nn.GroupNorm, update=update_group_norm, width="num_channels",
            shape=checked_same_shape(lambda m, x: x.ndim >= 2 and x.shape[1] == m.num_channels))
register_op(nn.PReLU, update=update_prelu, shape=checked_same_shape(_prelu_fits))
