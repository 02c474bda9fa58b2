"""``slim()``: trace -> group -> score -> plan -> shrink -> verify, in one call.

Thin front ends over :class:`~structprune.pipeline.PruningSession`; the options are the typed sections
of :class:`~structprune.options.Options`, given as flat keywords.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from .errors import TraceError
from .graph.dependency_graph import DependencyGraph
from .options import Options, require_prunable
from .piecewise import PiecewiseReport, slim_submodules
from .pipeline import PruningSession
from .planning.planner import Plan
from .tools.metrics import count_parameters
from .verify import VerificationResult


@dataclass
class SlimReport:
    """What :func:`slim` did: the graph it built, what it dropped, sizes, and the verification verdict.

    ``str(report)`` summarises it in a few lines.

    Attributes:
        graph: the dependency graph of the original model.
        plan: the plan that was applied (dropped units per group).
        params_before: parameter count of the original model.
        params_after: parameter count of the pruned model.
        verification: the verdict (None with ``verify=False``).
        pruned_groups: group id -> ``(units before, units after)`` for every group the plan shrank.
        widths: producing layer -> its prunable width before pruning.
    """

    graph: DependencyGraph
    plan: Plan
    params_before: int
    params_after: int
    verification: Optional[VerificationResult]
    pruned_groups: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # id -> (units before, after)
    widths: Dict[str, int] = field(default_factory=dict)  # producing layer -> prunable width before pruning

    @property
    def groups_pruned(self) -> int:
        """Number of channel groups the plan shrank."""
        return len(self.pruned_groups)

    @property
    def unknown_ops(self) -> Dict[str, int]:
        """Op -> how many times it occurs without a rule (their channels were kept)."""
        return dict(self.graph.unknown_ops)

    def __str__(self) -> str:
        removed = 1 - self.params_after / max(self.params_before, 1)
        lines = [f"pruned {self.groups_pruned} of {len(self.graph.groups)} channel groups "
                 f"({len(self.graph.prunable_groups)} prunable); parameters {self.params_before:,} -> "
                 f"{self.params_after:,} ({removed:.1%} removed)"]
        if self.graph.unknown_ops:
            lines.append("ops without a rule (their channels were kept): "
                         + ", ".join(f"{k} x{v}" for k, v in self.graph.unknown_ops.items()))
        lines.extend(self.graph.notes)
        if self.verification is not None:
            lines.append(str(self.verification))
        return "\n".join(lines)


def slim_with_report(model: nn.Module, example_input: Any, ratio: float = 0.5,
                     **options: Any) -> Tuple[nn.Module, Union[SlimReport, PiecewiseReport]]:
    """Like :func:`slim`, also returning a :class:`SlimReport`.

    A model that cannot be captured whole (a detector's data-dependent ``forward``) has its largest
    traceable submodules pruned one by one instead, each verified, and the whole pruned model run; the
    report is then a :class:`~structprune.piecewise.PiecewiseReport` (see
    :func:`~structprune.piecewise.slim_submodules`)."""
    try:
        return slim_whole_model(model, example_input, ratio, **options)
    except TraceError as error:
        # detectors and other models with data-dependent control flow: prune the parts that do trace
        if not any(next(child.parameters(), None) is not None for child in model.children()):
            raise
        return slim_submodules(model, example_input, ratio, trace_error=str(error), **options)


def slim_whole_model(model: nn.Module, example_input: Any, ratio: float = 0.5,
                     **options: Any) -> Tuple[nn.Module, SlimReport]:
    """:func:`slim_with_report` on the model's whole graph only: a model that cannot be captured raises
    :class:`~structprune.errors.TraceError` (what :class:`structprune.Pruner`'s schedules need).

    ``reference_widths`` (layer name -> width before any pruning, see :attr:`SlimReport.widths`) makes
    ``ratio`` count from those widths: what :class:`structprune.Pruner` uses between steps."""
    require_prunable(model)  # first: a wrong model explains any other error
    session = PruningSession(model, example_input, Options.parse({"ratio": ratio, **options}, caller="slim"))
    plan = session.plan()
    params_before = count_parameters(model)
    pruned, verdict = session.apply(plan)
    report = SlimReport(session.graph, plan, params_before, count_parameters(pruned), verdict,
                        session.pruned_groups(plan), {layer.name: layer.width for layer in session.planner().layers})
    return pruned, report


def slim(model: nn.Module, example_input: Any, ratio: float = 0.5, **options: Any) -> nn.Module:
    """Return a structurally pruned copy of ``model``.

    Args:
        model: any ``nn.Module``; it is traced with torch.fx (torch.export as a fallback).
        example_input: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        ratio: fraction of channels removed, in [0, 1): from every layer (``scope="local"``) or
            from the whole model, least important first (``scope="global"``). At least one channel
            of every layer is kept.

    Keyword Args:
        criterion (str | Criterion | Callable): how channels are ranked: ``"l2"`` (default), ``"l1"``,
            ``"magnitude"``, ``"gradient"``, ``"taylor"``, ``"fpgm"``, ``"bn_scale"``, ``"random"``, the
            activation-aware ``"wanda"`` and ``"flap"``, any name :func:`register_criterion` added, or a
            function ``(group, context) -> scores``.
        data (Iterable | None): calibration batches (a list or a DataLoader): gradient criteria compute
            ``loss_fn`` on them; activation-aware criteria and bias compensation only run them (tensors,
            dicts of inputs, or ``(inputs, targets)`` pairs).
        loss_fn (Callable | None): ``loss_fn(model, batch) -> scalar`` for gradient criteria (default:
            cross-entropy on ``(inputs, targets)`` batches).
        reduction (str): combine member scores by ``"mean"`` (default), ``"sum"`` or ``"max"``.
        seed (int | None): seed of the ``random`` criterion.
        target (Mapping[str, float] | None): ``{"params": f}`` or ``{"macs": f}``: remove that fraction of
            the model instead of a channel ratio (reached within one percentage point); ``{"latency": f}``:
            that fraction of the forward's latency, measured on the model's device and dtype.
        scope (str): ``"local"`` (default) or ``"global"``.
        max_group_ratio (float): the most global scope takes from any one layer (default 1.0: no cap).
        round_to (int | str | None): keep widths that are multiples of this number; ``"auto"`` (default)
            picks what the model's device and dtype run well, None keeps exactly what the ratio gives.
        ignore (str | nn.Module | type | Iterable): modules kept whole: names or globs, instances, or
            classes; a parent (``"layer4"``, ``model.layer4``) covers every module in it, and an entry
            naming no module raises.
        ratios (Mapping[str, float] | None): ``{"module.glob.*": ratio}`` overrides for matching layers (a
            parent's name covers the layers in it); a pattern naming no module raises.
        normalize (str | None): per-group score normalisation for global ranking: ``"mean"`` (default),
            ``"max"``, ``"sum"``, ``"standard"`` or None.
        hidden (bool): also prune widths that LayerNorm/RMSNorm normalise (a transformer's residual stream,
            embeddings and tied heads included; default True). ``False`` prunes only heads and
            feed-forward widths.
        uniform_blocks (bool | None): repeated blocks (``model.layers.3.mlp``, ``model.layers.7.mlp``) keep
            one width. ``None`` (default): on for Hugging Face models, so that their config describes the
            pruned model and ``save_pretrained``/``from_pretrained`` rebuild it; ``False``: each block its own.
        reference_widths (Mapping[str, int] | None): layer name -> width before any pruning; ``ratio`` then
            counts from those widths (what :class:`Pruner` passes between steps).
        verify (bool): check the pruned model against the original with the removed channels zeroed and
            raise :class:`VerificationError` (leaving ``model`` untouched) if they disagree (default True).
        inplace (bool): prune ``model`` itself instead of a deep copy (restored if anything fails; default
            False).
        compensate (bool): fold the calibration mean (with ``data``) of every removed input channel into the
            bias of the linear layers reading it (default True; FLAP's bias compensation); without ``data``,
            only channels that are constant whatever the input (dead channels) are folded.
        tracer (str): ``"auto"`` (default: torch.fx, then torch.export when fx fails), ``"fx"`` or
            ``"export"``.
        attention (str): where a projection is split into heads (found in the graph, no head count
            needed), prune whole ``"heads"`` (default; grouped-query attention drops a key/value head with
            its query heads) or the same ``"head_dims"`` in every head (the softmax scale is kept: head dims
            under an implicit ``1/sqrt(head_dim)`` scale stay whole).

    The keyword options are the fields of :class:`Options`, given flat.

    A model that neither tracer can capture whole (a detector's data-dependent ``forward``) is pruned
    part by part: its largest submodules that do capture, each on the input it receives, each verified,
    their interfaces kept; then the whole pruned model is run (:func:`~structprune.piecewise.slim_submodules`).

    Returns:
        The pruned model: same classes, attribute names and ``state_dict`` keys, smaller tensors.

    Raises:
        InvalidOptionError: an unknown keyword option (the message names the closest valid one), or a value
            an option cannot take.
        VerificationError: with ``verify=True``, the pruned model disagrees with the original
            (``model`` is left untouched).
    """
    return slim_with_report(model, example_input, ratio, **options)[0]
