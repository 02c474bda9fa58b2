"""Importance criteria: one registry for channel scores and element scores.

A :class:`Criterion` has a *channel* form, ``(group, context) -> scores`` (one score per unit of a
coupled group, higher = keep), used by ``slim``, ``SoftPruner``, channel masks and the regularisers,
and optionally an *element* form, ``(name, tensor, context) -> scores shaped like the tensor``, used by
the shape-keeping granularities of ``sparsify`` (element, N:M, vector, kernel). Both forms read the same
:class:`~structprune.scoring.context.ScoringContext`, so gradients are collected one way for both.

Every channel criterion scores each member slice of a group (a conv's filters, the BN entries, the next
layer's input columns) and aggregates the per-member scores (``context.reduction``: mean, sum or max).
Built-in criteria, after the textbook chapter the project follows:

=============  ==================================================================================
``magnitude``  mean |w| over the unit's slice in each member (element-wise magnitude, averaged, so a
               BN scale and a 3x3 filter row weigh alike whatever their size)
``l1``         L1 norm of the unit's slice in each member
``l2``         L2 norm of the unit's slice in each member (default)
``gradient``   mean |dL/dw| over calibration batches, summed over the slice
``taylor``     first-order Taylor (Molchanov et al.): |sum over a channel's slice of w * dL/dw| per
               batch, summed over batches (per element: |w * dL/dw| per batch, summed)
``fpgm``       He et al. 2019: sum of distances from each slice to the others in its member (the
               slices closest to the geometric median are the most replaceable, so score lowest)
``bn_scale``   Network Slimming: |gamma| of the normalisation scales in the group (L2 when a group
               has none)
``random``     uniform scores from a generator seeded by ``context.seed``
``wanda``      Wanda (Sun et al. 2024), structured: sum over the unit's slice of |w| * ||x||, where
               ||x|| is the L2 norm over the calibration data of the input feature the weight reads
``flap``       FLAP's fluctuation (An et al. 2024): for every layer reading the channel, the variance
               of that input over the calibration data times the squared norm of the weights
               reading it (what removing it changes beyond its mean, which bias compensation restores)
=============  ==================================================================================

``wanda`` and ``flap`` read activation statistics of the calibration data (``data=``, streamed, see
:mod:`structprune.scoring.activations`); the members they cannot weigh by an input (a norm's scale, a
bias, an embedding) do not count, and a group with no such member falls back to ``l2``.

Register more with :func:`register_criterion`; any callable ``(group, context) -> scores`` also works
wherever channels are scored. :func:`list_criteria` names what is registered.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union, cast

import numpy as np
import torch
from torch import nn

from ..errors import InvalidOptionError
from ..graph.dependency_graph import Group
from ..options import NORMALIZATIONS, check_choice
from .activations import InputStatistics, per_weight_column
from .context import ScoringContext, _channel_sums

ChannelScore = Callable[[Group, ScoringContext], Any]
ElementScore = Callable[[str, torch.Tensor, ScoringContext], torch.Tensor]
STRUCTURE_REDUCTIONS = ("sum", "mean", "root_sum")


@dataclass(frozen=True)
class Criterion:
    """A named importance criterion.

    ``channel(group, context)`` scores the units of a group; ``element(name, tensor, context)`` (optional)
    scores every element of a parameter, and ``structure`` says how element scores combine over a
    vector or kernel: ``"sum"``, ``"mean"`` or ``"root_sum"`` (the square root of the sum: an L2 norm
    from squared elements). Calling a criterion calls its channel form.
    """

    name: str
    channel: ChannelScore
    element: Optional[ElementScore] = None
    structure: str = "sum"

    def __call__(self, group: Group, context: ScoringContext) -> Any:
        return self.channel(group, context)

    def element_scores(self, name: str, tensor: torch.Tensor, context: ScoringContext) -> torch.Tensor:
        """Per-element scores of ``tensor``; raises when the criterion only knows channels."""
        if self.element is None:
            raise InvalidOptionError(f"criterion {self.name!r} scores channel groups only; use it with "
                                     f"granularity='channel', pick one of {list_criteria(element=True)}, or "
                                     f"register it with register_criterion(..., element=fn)")
        return self.element(name, tensor, context)


_CRITERIA: Dict[str, Criterion] = {}


def register_criterion(name: str, *, element: Optional[ElementScore] = None,
                       structure: str = "sum") -> Callable[[ChannelScore], ChannelScore]:
    """Register ``fn(group, context) -> scores`` under ``name`` (usable as ``criterion=name`` by ``slim``,
    ``sparsify``, ``SoftPruner``, ``LotteryTicket`` and ``regularizer``).

    ``element=fn(name, tensor, context) -> scores`` adds the element form that ``sparsify``'s finer
    granularities need; ``structure`` says how its scores combine over a vector or kernel.
    Registering a name again replaces the criterion, with a warning.
    """
    check_choice("structure", structure, STRUCTURE_REDUCTIONS)
    if not isinstance(name, str) or not name:
        raise InvalidOptionError(f"a criterion is registered under a name (a non-empty str), e.g. "
                                 f"@register_criterion('my_score'); got {name!r}")
    if element is not None and not callable(element):
        raise InvalidOptionError(f"element must be a function (name, tensor, context) -> scores, got {element!r}")

    def register(fn: ChannelScore) -> ChannelScore:
        if name in _CRITERIA and _CRITERIA[name].channel is not fn:
            warnings.warn(f"criterion {name!r} is registered again; the new one replaces the old", stacklevel=2)
        _CRITERIA[name] = Criterion(name, fn, element, structure)
        return fn

    return register


def list_criteria(element: bool = False) -> List[str]:
    """Names of the registered criteria (``element=True``: only those that also score elements)."""
    return sorted(name for name, c in _CRITERIA.items() if not element or c.element is not None)


def get_criterion(criterion: Union[str, Criterion, ChannelScore]) -> Criterion:
    """The :class:`Criterion` for a registered name, a criterion, or a function ``(group, context) -> scores``."""
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, str):
        found = _CRITERIA.get(criterion)
        if found is None:
            raise InvalidOptionError(f"unknown criterion {criterion!r}; choose one of {list_criteria()} "
                                     "or pass a function (group, context) -> scores")
        return found
    if callable(criterion):
        return Criterion(getattr(criterion, "__name__", "custom"), criterion)
    raise InvalidOptionError(f"criterion must be a name ({list_criteria()}) or a function (group, context) -> "
                             f"scores, not {type(criterion).__name__}")


def normalize(scores: np.ndarray, how: Optional[str]) -> np.ndarray:
    """Scale a group's scores so groups of different size and magnitude compare (global scope).

    ``"mean"``, ``"max"``, ``"sum"`` divide by that statistic of the absolute scores; ``"standard"``
    standardises them (minus the mean, over the standard deviation), as FLAP's adaptive structure search
    does, so that a layer loses more where its scores spread further below its own average."""
    if how is None:
        return scores
    check_choice("normalize", how, NORMALIZATIONS)
    if how == "standard":
        spread = float(scores.std()) if scores.size else 0.0
        return (scores - scores.mean()) / spread if spread > 0 else np.zeros_like(scores, dtype=np.float64)
    reducers: Dict[str, Callable[[np.ndarray], float]] = {"mean": np.mean, "max": np.max, "sum": np.sum}
    scale = reducers[how](np.abs(scores)) if scores.size else 0.0
    return scores / scale if scale > 0 else scores


def _elementwise(group: Group, ctx: ScoringContext, fn: Callable[[torch.Tensor], torch.Tensor], key: str,
                 finish: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        values = ctx.axis_sums(space.tensor, lambda: fn(t.detach()), key, space.dim)
        # bincount with weights adds up every position of the member that belongs to one unit (a grouped conv's
        # tied positions, a head's head_dim channels); ``finish`` runs after, so l2 is the root of the whole sum
        per_member.append(finish(np.bincount(index, weights=values, minlength=group.n_units)))
    return ctx.combine(group, per_member)


# ---- element forms: one score per weight, shaped like the weight ---------------------------------------------
def _absolute(name: str, tensor: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
    return tensor.detach().abs()


def _squared(name: str, tensor: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
    return tensor.detach().square()


def _gradient_elements(name: str, tensor: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
    magnitude = ctx.gradient_of(tensor, "abs").abs
    assert magnitude is not None
    return magnitude


def _taylor_elements(name: str, tensor: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
    taylor = ctx.gradient_of(tensor, "element_taylor").element_taylor
    assert taylor is not None
    return taylor


def _random_elements(name: str, tensor: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
    # seeded per tensor name, so a tensor's scores do not depend on which other tensors are scored
    seed = (0 if ctx.seed is None else ctx.seed) * 1_000_003 + zlib.crc32(name.encode())
    return torch.rand(tensor.shape, generator=torch.Generator().manual_seed(seed)).to(tensor.device)


# ---- the built-in criteria ------------------------------------------------------------------------------------
@register_criterion("magnitude", element=_absolute, structure="mean")
def magnitude(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Mean |w| over the unit's slice in each member, aggregated over members.

    Unlike ``l1`` (the slice's norm), members with long slices (conv filters) do not outweigh
    members with one weight per channel (BN scales, biases).
    """
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        values = ctx.axis_sums(space.tensor, lambda: t.detach().abs(), "abs", space.dim)
        per_position = t.numel() // t.shape[space.dim]
        sums = np.bincount(index, weights=values, minlength=group.n_units)
        # the number of weights behind each unit, so that the mean is over the unit's whole slice
        counts = np.bincount(index, minlength=group.n_units) * per_position
        per_member.append(sums / np.maximum(counts, 1))
    return ctx.combine(group, per_member)


@register_criterion("l1", element=_absolute)
def l1_norm(group: Group, ctx: ScoringContext) -> np.ndarray:
    """L1 norm of the unit's slice in each member, aggregated over members."""
    return _elementwise(group, ctx, torch.abs, "abs")


@register_criterion("l2", element=_squared, structure="root_sum")
def l2_norm(group: Group, ctx: ScoringContext) -> np.ndarray:
    """L2 norm of the unit's slice in each member, aggregated over members."""
    return _elementwise(group, ctx, torch.square, "square", np.sqrt)


@register_criterion("gradient", element=_gradient_elements)
def gradient(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Mean |dL/dw| over the calibration batches, summed over the unit's slice in each member."""
    grads = ctx.gradients("abs")
    per_member = []
    for space, index, _ in ctx.trainable_members(group):
        values = ctx.axis_sums(space.tensor, lambda: cast(torch.Tensor, grads[space.tensor].abs), "grad", space.dim)
        per_member.append(np.bincount(index, weights=values, minlength=group.n_units))
    return ctx.combine(group, per_member)


@register_criterion("taylor", element=_taylor_elements)
def taylor(group: Group, ctx: ScoringContext) -> np.ndarray:
    """First-order Taylor importance: per batch |sum over the channel's slice of w * dL/dw|, summed
    over batches (taking the magnitude per batch keeps opposite-signed batches from cancelling)."""
    grads = ctx.gradients("channel_taylor")
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        per_dim = grads[space.tensor].channel_taylor or []
        if space.dim < len(per_dim):
            values = per_dim[space.dim].cpu().numpy()
        else:  # an axis beyond the first two (rare): fall back to the summed-then-absolute form
            mean_grad = ctx.gradients("abs")[space.tensor].abs
            assert mean_grad is not None
            values = np.abs(_channel_sums(t.detach() * mean_grad, space.dim).cpu().numpy())
        per_member.append(np.bincount(index, weights=values, minlength=group.n_units))
    return ctx.combine(group, per_member)


@register_criterion("fpgm")
def fpgm(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Filter pruning via geometric median (He et al. 2019).

    In each member, a slice's score is the sum of its Euclidean distances to the member's other
    slices: the slices nearest the geometric median are the easiest to replace and score lowest.
    """
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        rows = t.detach().movedim(space.dim, 0).reshape(t.shape[space.dim], -1).float()
        distances = torch.cdist(rows, rows).sum(1).double().cpu().numpy()
        per_member.append(np.bincount(index, weights=distances, minlength=group.n_units))
    return ctx.combine(group, per_member)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@register_criterion("bn_scale")
def bn_scale(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Network Slimming (Liu et al. 2017): |gamma| of the group's normalisation scales.

    Groups without a normalisation scale fall back to :func:`l2_norm`.
    """
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        path, _, attr = space.tensor.rpartition(".")
        owner = ctx.model.get_submodule(path) if path else ctx.model
        if attr == "weight" and isinstance(owner, _NORMS):
            values = t.detach().abs().double().reshape(-1).cpu().numpy()
            per_member.append(np.bincount(index, weights=values, minlength=group.n_units))
    return ctx.combine(group, per_member) if per_member else l2_norm(group, ctx)


def _activation_weighted(group: Group, ctx: ScoringContext, input_side_only: bool,
                         score: Callable[[torch.Tensor, InputStatistics], torch.Tensor]) -> np.ndarray:
    """Per member that reads calibrated inputs, ``score(weight, stats)`` (shaped like the weight) summed on the unit's
    axis; ``input_side_only`` counts a weight only where the group cuts its input dim."""
    statistics = ctx.activations()
    per_member = []
    for space, index, t in ctx.trainable_members(group):
        stats = statistics.get(space.tensor)
        if stats is None or t.dim() < 2 or (input_side_only and space.dim != stats.axis):
            continue
        values = ctx.axis_sums(space.tensor, lambda: score(t.detach(), stats), score.__name__, space.dim)
        per_member.append(np.bincount(index, weights=values, minlength=group.n_units))
    return ctx.combine(group, per_member) if per_member else l2_norm(group, ctx)


def _wanda_matrix(weight: torch.Tensor, stats: InputStatistics) -> torch.Tensor:
    return weight.abs().float() * per_weight_column(stats, weight, stats.norm)


def _fluctuation_matrix(weight: torch.Tensor, stats: InputStatistics) -> torch.Tensor:
    return weight.float().square() * per_weight_column(stats, weight, stats.variance)


@register_criterion("wanda")
def wanda(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Structured Wanda: |w| times the calibration norm of the input each weight reads, summed over the
    unit's slice in every layer that reads calibrated inputs."""
    return _activation_weighted(group, ctx, False, _wanda_matrix)


@register_criterion("flap")
def flap(group: Group, ctx: ScoringContext) -> np.ndarray:
    """FLAP's fluctuation: for each layer reading the unit as an input, the input's variance over the
    calibration data times the squared norm of the weights reading it."""
    return _activation_weighted(group, ctx, True, _fluctuation_matrix)


@register_criterion("random", element=_random_elements)
def random_scores(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Uniform random scores (the pruning-at-initialisation baseline), reproducible with ``seed``."""
    seed = ctx.seed if ctx.seed is not None else 0
    return np.random.default_rng([seed, group.id]).random(group.n_units)
