"""Typed options of a pruning run, validated in one place.

A run has four kinds of options, one frozen dataclass each, in the order the pipeline uses them:

* :class:`TraceOptions`: how the graph is captured and what a head split prunes;
* :class:`ScoreOptions`: how channels are ranked (criterion, calibration data, loss, reduction);
* :class:`PlanOptions`: how much is removed and where (ratio or target, scope, rounding, ignore);
* :class:`PruneOptions`: how the plan is applied (verification, in place or on a copy).

:class:`Options` bundles them, and :meth:`Options.from_kwargs` is the one place where the flat
keywords of the public functions (``slim(model, x, 0.5, scope="global", round_to=8)``) are sorted into
their sections. Every invalid value raises :class:`~structprune.errors.InvalidOptionError` (or its
:class:`~structprune.errors.InvalidRatioError` subclass) naming what to pass instead.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import InvalidModelError, InvalidOptionError, InvalidRatioError

SCOPES = ("local", "global")
REDUCTIONS = ("mean", "sum", "max")
NORMALIZATIONS = (None, "mean", "max", "sum", "standard")
TRACERS = ("auto", "fx", "export")
ATTENTION_MODES = ("heads", "head_dims")
TARGETS = ("params", "macs", "latency")
RoundTo = Union[int, str, None]  # a channel multiple, "auto" (the hardware's, see planning.hardware), or None: off


# ---- validators: each returns the cleaned value or raises with what to pass instead ----------------------------
def as_scalar(value: Any) -> Any:
    """A one-element numpy array or tensor as its Python number (``torch.tensor(0.3)`` is a fine ratio)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def check_fraction(name: str, value: Any, *, closed: bool = False, example: Optional[str] = None) -> float:
    """A real number in [0, 1) (``closed``: [0, 1]); ``example`` is the valid call the message suggests."""
    upper = "1]" if closed else "1)"
    suggestion = example or f"{name}=0.5"
    value = as_scalar(value)
    # bool is a Real: ``ratio=True`` would otherwise pass as 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidRatioError(f"{name} must be a number in [0, {upper}, got {value!r}; pass e.g. {suggestion}")
    if not (0 <= float(value) <= 1 if closed else 0 <= float(value) < 1):
        raise InvalidRatioError(f"{name} must be in [0, {upper} (the fraction removed), got {value}; "
                                f"pass e.g. {suggestion}")
    return float(value)


def check_integer(name: str, value: Any, *, low: int, high: Optional[int] = None, example: str = "") -> int:
    """An integer (Python, numpy or 0-d tensor) in [low, high)."""
    value = as_scalar(value)
    exact = int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None
    if exact is None or exact < low or (high is not None and exact >= high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high})"
        raise InvalidOptionError(f"{name} must be an integer {bounds}, got {value!r}"
                                 + (f"; pass e.g. {example}" if example else ""))
    return exact


def require_module(model: Any, name: str = "model") -> nn.Module:
    """``model`` itself if it is an ``nn.Module``; else :class:`InvalidModelError` saying what to pass."""
    if isinstance(model, nn.Module):
        return model
    raise InvalidModelError(f"{name} must be a torch.nn.Module, not {type(model).__name__}; pass the model itself")


def require_prunable(model: Any, name: str = "model") -> nn.Module:
    """:func:`require_module`, refusing a ``torch.jit.ScriptModule`` too: it is an ``nn.Module`` whose Python
    ``forward`` is gone, so neither tracer can capture it, and their own complaints would point at control flow
    (what measures a model, such as ``count_parameters``, takes one: it uses :func:`require_module`)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidModelError(f"{name} is a TorchScript module ({type(model).__name__}), compiled by "
                                f"torch.jit.script or torch.jit.trace: its graph cannot be captured or pruned. "
                                f"Pass the original nn.Module (before torch.jit.script/trace), and script or trace "
                                f"the pruned model afterwards if you need TorchScript.")
    model = require_module(model, name)
    _refuse_all_quantized(model, name)
    return model


_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")


def _refuse_all_quantized(model: nn.Module, name: str) -> None:
    """A model whose every weighted layer is quantized (``torch.ao.quantization.quantize_dynamic``, ``convert``)
    has no channels to find: its weights are packed integers, not tensors a plan can slice. Without this check
    it would come back unchanged, with nothing said. A partly quantized model is pruned where it is float."""
    quantized = [m._get_name() for m in model.modules()  # _get_name: DynamicQuantizedLinear, not Linear
                 if type(m).__module__.startswith(_QUANTIZED_MODULES) and not type(m).__name__.endswith("PackedParams")]
    if not quantized or any(p.is_floating_point() and p.dim() >= 2 for p in model.parameters()):
        return
    kinds = ", ".join(sorted(set(quantized)))
    raise InvalidModelError(f"{name} is quantized ({len(quantized)} modules: {kinds}): its weights are packed "
                            f"integers that cannot be sliced. Prune the float model, then quantize the pruned one.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise InvalidOptionError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{name} must be True or False, got {value!r}")
    return value


def check_positive_int(name: str, value: Any, *, optional: bool = True) -> Optional[int]:
    if value is None and optional:
        return None
    value = as_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidOptionError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}; "
                                 f"pass e.g. {name}=8")
    return int(value)


def check_round_to(value: Any) -> RoundTo:
    """``"auto"``, a positive integer, or None (1 and None both mean: no rounding)."""
    if value == "auto" and isinstance(value, str):
        return value
    try:
        return check_positive_int("round_to", value)
    except InvalidOptionError:
        raise InvalidOptionError(f"round_to must be 'auto', a positive integer or None, got {value!r}; pass e.g. "
                                 f"round_to=8, or round_to=None to keep the exact widths the ratio gives") from None


def check_callable(name: str, value: Any, signature: str) -> Optional[Callable]:
    if value is not None and not callable(value):
        raise InvalidOptionError(f"{name} must be a function {signature} or None, got {type(value).__name__}")
    return value


def check_target(target: Any) -> Optional[Tuple[str, float]]:
    """``{"params": f}``, ``{"macs": f}`` or ``{"latency": f}`` -> ``(kind, f)``; None stays None."""
    if target is None:
        return None
    if not isinstance(target, Mapping) or len(target) != 1:
        raise InvalidOptionError(f"target must be a dict with one entry, {{'params': f}}, {{'macs': f}} or "
                                 f"{{'latency': f}}, "
                                 f"got {target!r}")
    (kind, fraction), = target.items()
    if kind not in TARGETS:
        raise InvalidOptionError(f"target must name one of {', '.join(map(repr, TARGETS))}; got {kind!r}")
    return kind, check_fraction(f"target[{kind!r}]", fraction, example=f"target={{{kind!r}: 0.3}}")


def check_ignore(ignore: Any) -> Tuple[Any, ...]:
    """Module names or globs, module instances, or module classes (one, or a list of them)."""
    items = list(ignore) if isinstance(ignore, (list, tuple, set, frozenset)) else [ignore]
    for item in items:
        if not (isinstance(item, (str, nn.Module)) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise InvalidOptionError(f"ignore takes module names or globs ('layer4.*'), modules or module classes "
                                     f"(nn.Embedding); got {item!r}")
    return tuple(items)


def check_ratios(ratios: Any) -> Dict[str, float]:
    if ratios is None:
        return {}
    if not isinstance(ratios, Mapping) or not all(isinstance(k, str) for k in ratios):
        raise InvalidOptionError(f"ratios must map module-name globs to ratios, e.g. {{'layer4.*': 0.7}}; "
                                 f"got {ratios!r}")
    return {pattern: check_fraction(f"ratios[{pattern!r}]", r, closed=True) for pattern, r in ratios.items()}


# ---- the four sections ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceOptions:
    """How the graph is captured (``tracer``) and what a head split prunes (``attention``).

    Attributes:
        tracer: ``"auto"`` (torch.fx, then torch.export when fx fails), ``"fx"`` or ``"export"``.
        attention: where a projection is split into heads, prune whole ``"heads"`` (grouped-query
            attention drops a key/value head with its query heads) or the same ``"head_dims"`` in every head.
    """

    tracer: str = "auto"
    attention: str = "heads"

    def __post_init__(self) -> None:
        check_choice("tracer", self.tracer, TRACERS)
        check_choice("attention", self.attention, ATTENTION_MODES)


@dataclass(frozen=True)
class ScoreOptions:
    """How channels are ranked.

    Attributes:
        criterion: a registered name (``sp.list_criteria()``: ``"l2"`` by default, ``"l1"``,
            ``"magnitude"``, ``"gradient"``, ``"taylor"``, ``"fpgm"``, ``"bn_scale"``, ``"random"``), a
            :class:`~structprune.scoring.Criterion`, or a function ``(group, context) -> scores``.
        data: calibration batches (a list or a DataLoader).
        loss_fn: ``loss_fn(model, batch)`` for gradient criteria (default loss: cross-entropy on
            ``(inputs, targets)`` batches).
        reduction: how the scores of a unit's members combine: ``"mean"``, ``"sum"`` or ``"max"``.
        seed: seed of the ``random`` criterion.
    """

    criterion: Any = "l2"
    data: Optional[Iterable] = None
    loss_fn: Optional[Callable] = None
    reduction: str = "mean"
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        # imported here: scoring imports options, so a module-level import would be a cycle
        from .scoring.criteria import get_criterion  # the registry validates names and callables

        get_criterion(self.criterion)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_callable("loss_fn", self.loss_fn, "(model, batch) -> scalar loss")
        if self.data is not None and not isinstance(self.data, Iterable):
            raise InvalidOptionError(f"data must be an iterable of calibration batches (a list or a DataLoader), "
                                     f"got {type(self.data).__name__}")
        if self.seed is not None:  # numpy and torch generators both take [0, 2**32)
            try:
                object.__setattr__(self, "seed", check_integer("seed", self.seed, low=0, high=2 ** 32,
                                                               example="seed=0"))
            except InvalidOptionError:
                raise InvalidOptionError(f"seed must be an integer in [0, 2**32) or None, got {self.seed!r}; "
                                         f"pass e.g. seed=0") from None


@dataclass(frozen=True)
class PlanOptions:
    """How much to remove and where.

    Attributes:
        ratio: fraction of channels removed, in [0, 1): from every layer (``scope="local"``) or from the
            whole model, least important first (``scope="global"``). At least one channel of every layer
            is kept. Ignored when ``target`` is given.
        target: ``{"params": f}`` or ``{"macs": f}``: remove that fraction of the model instead (within one
            percentage point); ``{"latency": f}``: remove that fraction of the forward's latency, measured on
            the model's device and dtype at the example input's batch (the pruned model runs in
            ``1 - f`` of the dense time, within 5% of it).
        scope: ``"local"`` or ``"global"``.
        max_group_ratio: the largest fraction global scope takes from any one layer (1.0: no cap).
        round_to: keep widths that are multiples of this number of channels. ``"auto"`` (the default) keeps
            the widths the model's device and dtype run well (multiples of up to 64 on a GPU, 16 on a CPU
            in fp32; see :mod:`structprune.planning.hardware`); ``None`` keeps exactly what the ratio gives.
        ignore: modules kept whole: names or globs, instances, or classes; a parent (``"layer4"``,
            ``model.layer4``) covers every module in it. An entry naming no module of the model raises
            :class:`~structprune.errors.InvalidOptionError` when the session starts
            (see :mod:`structprune.planning.patterns`).
        ratios: ``{"module.glob.*": ratio}`` overrides for matching layers, a parent's name covering the
            layers in it (a pattern naming the layer itself wins); a pattern naming no module raises.
        normalize: per-group score normalisation for global ranking: ``"mean"``, ``"max"``, ``"sum"``,
            ``"standard"`` (z-scores, FLAP's adaptive structure) or None.
        hidden: also prune widths that LayerNorm/RMSNorm normalise (a transformer's residual stream).
        uniform_blocks: repeated blocks (layers whose paths differ only in the block number, such as
            ``model.layers.3.mlp`` and ``model.layers.7.mlp``) all keep the same width, the mean of what the
            plan gave them, each dropping its own lowest-scoring units. ``None`` (the default) does so for
            Hugging Face models, whose config holds one width per kind of layer: then ``save_pretrained`` and
            ``from_pretrained`` rebuild the pruned model. ``False`` lets every block keep its own width (a better
            allocation; reload with :func:`structprune.load`).
        reference_widths: layer name -> width before any pruning; ``ratio`` then counts from those widths
            (what :class:`~structprune.Pruner` uses so a schedule's cumulative targets are met exactly).
    """

    ratio: float = 0.5
    target: Optional[Mapping[str, float]] = None
    scope: str = "local"
    max_group_ratio: float = 1.0
    round_to: RoundTo = "auto"
    ignore: Any = ()
    ratios: Optional[Mapping[str, float]] = field(default=None)
    normalize: Optional[str] = "mean"
    hidden: bool = True
    uniform_blocks: Optional[bool] = None
    reference_widths: Optional[Mapping[str, int]] = None

    def __post_init__(self) -> None:
        budget = check_target(self.target)
        if budget is None:
            object.__setattr__(self, "ratio", check_fraction("ratio", self.ratio))
        else:  # the budget search varies the ratio: a given one is kept (for replace(target=None)), none is fine
            try:
                object.__setattr__(self, "ratio", check_fraction("ratio", self.ratio))
            except InvalidRatioError:
                object.__setattr__(self, "ratio", 0.5)
        check_choice("scope", self.scope, SCOPES)
        object.__setattr__(self, "max_group_ratio", check_fraction("max_group_ratio", self.max_group_ratio,
                                                                   closed=True))
        object.__setattr__(self, "round_to", check_round_to(self.round_to))
        object.__setattr__(self, "ignore", check_ignore(self.ignore))
        object.__setattr__(self, "ratios", check_ratios(self.ratios))
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_flag("hidden", self.hidden)
        if self.uniform_blocks is not None:
            check_flag("uniform_blocks", self.uniform_blocks)

    @property
    def budget(self) -> Optional[Tuple[str, float]]:
        """``(kind, fraction)`` of the target, or None when a plain ratio is asked for."""
        return check_target(self.target)

    def with_ratio(self, ratio: float) -> "PlanOptions":
        """The same options at another ratio (what the budget search bisects on; 1.0 allowed here)."""
        changed = dataclasses.replace(self, target=None)
        # set after replace(): __post_init__ rejects 1.0, which the budget search needs to probe the maximum
        object.__setattr__(changed, "ratio", float(ratio))
        return changed


@dataclass(frozen=True)
class PruneOptions:
    """How a plan is applied.

    Attributes:
        verify: check the pruned model against the original with the removed channels zeroed and raise
            :class:`~structprune.VerificationError` (leaving the model untouched) if they disagree.
        inplace: prune the model itself instead of a copy (restored if anything fails).
        compensate: fold the mean contribution of every removed input channel into the bias of the linear
            layers (and unpadded convolutions) that read it, adding biases where there were none (FLAP's
            bias compensation; see :mod:`structprune.surgery.compensation`): the calibration mean with
            ``data=``, else only channels that are constant whatever the input (dead channels with a
            nonzero activation). Verification then holds those channels at those values.
    """

    verify: bool = True
    inplace: bool = False
    compensate: bool = True

    def __post_init__(self) -> None:
        check_flag("verify", self.verify)
        check_flag("inplace", self.inplace)
        check_flag("compensate", self.compensate)


_SECTIONS = {"trace": TraceOptions, "score": ScoreOptions, "plan": PlanOptions, "prune": PruneOptions}


@dataclass(frozen=True)
class Options:
    """All options of a pruning run, by section. Build it from flat keywords with :meth:`from_kwargs`."""

    trace: TraceOptions = field(default_factory=TraceOptions)
    score: ScoreOptions = field(default_factory=ScoreOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    prune: PruneOptions = field(default_factory=PruneOptions)

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """Every keyword :meth:`from_kwargs` accepts."""
        return tuple(f.name for section in _SECTIONS.values() for f in dataclasses.fields(section))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "Options":
        """Sort flat keywords (every name of :meth:`names`) into their sections and validate them."""
        return cls.parse(kwargs)

    @classmethod
    def parse(cls, options: Mapping[str, Any], *, allowed: Optional[Iterable[str]] = None,
              caller: str = "slim") -> "Options":
        """Like :meth:`from_kwargs`, for a front end: ``allowed`` restricts the names (an entry point that
        has no use for, say, ``inplace``) and ``caller`` names the function in the messages. An unknown
        name raises :class:`InvalidOptionError` naming the closest valid one, before any value is checked."""
        valid = tuple(allowed) if allowed is not None else cls.names()
        check_names(options, valid, caller)
        sections = {}
        for key, section in _SECTIONS.items():
            own = {f.name for f in dataclasses.fields(section)}
            sections[key] = section(**{k: v for k, v in options.items() if k in own})
        return cls(**sections)

    def replace(self, **kwargs: Any) -> "Options":
        """A copy with some flat keywords changed (validated like :meth:`from_kwargs`)."""
        check_names(kwargs, self.names(), "replace")
        sections = {}
        for key, section in _SECTIONS.items():
            own = {f.name for f in dataclasses.fields(section)}
            changes = {k: v for k, v in kwargs.items() if k in own}
            current = getattr(self, key)
            sections[key] = dataclasses.replace(current, **changes) if changes else current
        return Options(**sections)


def check_names(options: Mapping[str, Any], valid: Sequence[str], caller: str) -> None:
    """Every name in ``options`` is one of ``valid``; else say which one was probably meant."""
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            call = caller if caller.endswith(")") else f"{caller}()"
            raise InvalidOptionError(f"{call} has no option {name!r}{hint} Its options are: "
                                     f"{', '.join(sorted(valid))}")


__all__ = ["ATTENTION_MODES", "NORMALIZATIONS", "Options", "PlanOptions", "PruneOptions", "REDUCTIONS", "RoundTo",
           "SCOPES", "ScoreOptions", "TARGETS", "TRACERS", "TraceOptions", "as_scalar", "check_choice",
           "check_fraction", "check_integer", "check_names", "check_round_to", "check_target", "require_module",
           "require_prunable"]
