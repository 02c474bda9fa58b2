"""``sparsify``: mask a model at any granularity, scored by any registered criterion.

    sp.sparsify(model, sparsity=0.5)                                  # fine-grained, local, L1
    sp.sparsify(model, granularity="nm", n=2, m=4)
    sp.sparsify(model, sparsity=0.3, granularity="channel", example_input=x, scope="global")
    print(sp.sparsity_report(model))

Masked weights are not faster on their own: see docs/masks.md.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

from torch import nn

from ..errors import InvalidOptionError
from ..options import SCOPES, ScoreOptions, check_choice, check_fraction, require_module
from ..scoring import ScoringContext, get_criterion
from . import channels  # noqa: F401  (registers the "channel" granularity)
from .granularities import MaskRequest, check_axis, get_granularity
from .parametrize import SparsityReport


def sparsify(model: nn.Module, sparsity: float = 0.5, granularity: str = "element", *, n: int = 2, m: int = 4,
             axis: str = "row", scope: str = "local", criterion: Any = "l1", data: Optional[Iterable] = None,
             loss_fn: Optional[Callable] = None, example_input: Any = None, targets: Optional[Sequence[str]] = None,
             seed: Optional[int] = None, **channel_options: Any) -> SparsityReport:
    """Mask ``model`` in place at ``granularity`` and return its :func:`sparsity_report`.

    Args:
        model: the model to mask, in place (its weights are parametrized: ``weight -> weight * mask``).
        sparsity: the fraction of structures (weights, vectors, kernels, channels) masked: in every tensor
            (``scope="local"``) or across all of them, lowest scores first (``scope="global"``; structures
            are compared by their mean score so sizes do not matter). ``"nm"`` ignores it (N:M fixes it at
            (m - n) / m).
        granularity: one of :func:`~structprune.list_granularities` (element, nm, vector, kernel, channel).
        n: with ``"nm"``, the weights kept in every run of ``m`` along the input dimension.
        m: with ``"nm"``, the length of a run.
        axis: with ``"vector"``, mask whole rows (``"row"``: an output's weights) or columns
            (``"column"``: an input's weights).
        scope: ``"local"`` or ``"global"`` (see ``sparsity``).
        criterion: any registered criterion with an element form (l1, l2, magnitude, gradient, taylor,
            random), or for channels any criterion at all.
        data: calibration batches for gradient criteria.
        loss_fn: ``loss_fn(model, batch)`` for gradient criteria.
        example_input: needed by ``"channel"``, which masks every tensor that shares the channels (the
            next layer's inputs, norms, biases).
        targets: globs of parameter names to mask instead of the Linear/Conv weights.
        seed: seed of the ``random`` criterion.
        **channel_options: with ``"channel"``, the options of :func:`structprune.slim` (``ignore``,
            ``ratios``, ``round_to``, ``hidden``, ``tracer``, ``attention``...).

    Examples:
        ```python
        sp.sparsify(model, sparsity=0.5)                                  # fine-grained, local, L1
        sp.sparsify(model, granularity="nm", n=2, m=4)
        sp.sparsify(model, sparsity=0.3, granularity="channel", example_input=x, scope="global")
        print(sp.sparsity_report(model))
        ```
    """
    require_module(model)
    strategy = get_granularity(granularity)
    check_choice("scope", scope, SCOPES)
    check_axis(axis)
    if strategy.uses_sparsity:
        sparsity = check_fraction("sparsity", sparsity)
    if channel_options and strategy.name != "channel":
        raise InvalidOptionError(f"options {sorted(channel_options)} are slim's planning options and only apply to "
                                 f"granularity='channel'; remove them, or mask channels")
    if isinstance(targets, str):  # one glob: a string is not a list of globs
        targets = [targets]
    if targets is not None and not all(isinstance(pattern, str) for pattern in targets):
        raise InvalidOptionError(f"targets must be parameter-name globs such as ['fc.weight', 'layer*.conv*'], "
                                 f"got {targets!r}")
    score = ScoreOptions(criterion=criterion, data=data, loss_fn=loss_fn, seed=seed)
    context = ScoringContext(model, None, data=score.data, loss_fn=score.loss_fn, seed=score.seed)
    request = MaskRequest(model, sparsity, scope, get_criterion(criterion), context, targets, n, m, axis,
                          example_input, dict(channel_options))
    return strategy.apply(request)

