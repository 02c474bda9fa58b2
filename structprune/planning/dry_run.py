"""A dry run of a plan on the ``meta`` device: does the pruned model still run?

Some widths hide in the model's code where no graph shows them. ``torch.export`` bakes every shape
into literals, so ``x.reshape(B, N, 3, self.num_heads, C // self.num_heads)`` arrives as
``reshape(1, 197, 3, 4, 48)`` with no trace of ``C``: pruning ``C`` then breaks the reshape. Before
slicing real weights, the planned shapes are tried on a meta-device twin of the model (shapes only:
no arithmetic, no weight memory). If the forward fails, the groups responsible are found by
bisection and kept whole instead, and the report says so. Guarantee 1 still rests on verification;
this turns a would-be ``VerificationError`` into a smaller, working result.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..graph.capture import eval_mode
from ..graph.dependency_graph import DependencyGraph
from ..surgery.copying import meta_twin
from ..surgery.shrink import shrunk_copy


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _runs(model: nn.Module, dg: DependencyGraph, dropped: np.ndarray) -> Optional[str]:
    """None if the model shrunk by ``dropped`` runs on the meta example input, else the error."""
    # a fresh shrunk copy per try: the twin itself is reused by every step of the bisection
    pruned = shrunk_copy(model, dg, dropped)
    args, kwargs = _to_meta(dg.inputs.args), _to_meta(dg.inputs.kwargs)
    try:
        with torch.no_grad(), eval_mode(pruned):
            pruned(*args, **kwargs)
    except Exception as error:  # any failure of the pruned forward counts
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    return None


def groups_that_break(model: nn.Module, dg: DependencyGraph, drops: Dict[int, np.ndarray],
                      element_mask: Callable[[Dict[int, np.ndarray]], np.ndarray]) -> Dict[int, str]:
    """Groups of ``drops`` whose pruning makes the forward fail on the meta device, with the error.

    Empty when the whole plan runs, or when the unpruned model itself cannot run on meta (then
    nothing can be learned here and verification has the last word).
    """
    if not drops:
        return {}
    try:
        twin = meta_twin(model)
    except Exception:  # a model that cannot be copied to meta: leave it to verification
        return {}
    nothing = np.zeros(dg.n_elements, bool)
    # a model that fails on meta even unpruned (``.item()``, data-dependent shapes) would make every plan look
    # broken: then learn nothing and let verification decide
    if _runs(twin, dg, nothing) is not None:
        return {}
    order: List[int] = list(drops)
    broken: Dict[int, str] = {}
    while True:
        # one culprit per round, then retry the rest: several groups may break independently
        kept = [g for g in order if g not in broken]
        error = _runs(twin, dg, element_mask({g: drops[g] for g in kept}))
        if error is None or not kept:
            return broken
        # log2(n) meta forwards per culprit; assumes adding groups never repairs a failing forward
        low, high = 1, len(kept)  # the shortest failing prefix ends with a culprit
        while low < high:
            mid = (low + high) // 2
            if _runs(twin, dg, element_mask({g: drops[g] for g in kept[:mid]})) is not None:
                high = mid
            else:
                low = mid + 1
        culprit = kept[low - 1]
        # report the culprit's own error; if it only fails together with earlier groups, the combined one
        broken[culprit] = _runs(twin, dg, element_mask({culprit: drops[culprit]})) or error
