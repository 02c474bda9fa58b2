"""Granularities: how a weight is cut into structures that are masked as a whole.

One strategy object per granularity, registered by name (:func:`list_granularities`): single weights
(``"element"``), N:M runs along the input dimension (``"nm"``), whole rows or columns of a weight
matrix (``"vector"``), whole k x k kernels (``"kernel"``) and whole coupled channels (``"channel"``,
registered by :mod:`structprune.masks.channels`). A new granularity is one new strategy.
"""
from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InvalidOptionError, StructPruneError
from ..ops.registry import is_weighted
from ..options import check_choice, check_integer
from ..scoring import Criterion, ScoringContext
from .parametrize import SparsityReport, existing_mask, original, set_mask, sparsity_report

Rows = Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
Target = Tuple[str, nn.Module, str]  # fully-qualified name, owner module, attribute
VECTOR_AXES = ("row", "column")


@dataclass
class MaskRequest:
    """What :func:`~structprune.sparsify` was asked for, handed to the granularity's strategy."""

    model: nn.Module
    sparsity: float
    scope: str
    criterion: Criterion
    context: ScoringContext
    targets: Optional[Sequence[str]] = None
    n: int = 2
    m: int = 4
    axis: str = "row"
    example_input: Any = None
    options: Dict[str, Any] = field(default_factory=dict)  # pipeline options (channel granularity)

    def chosen(self) -> List[Target]:
        """Every tensor to mask: Linear/Conv weights by default, or the parameters matching ``targets``."""
        found = []
        for path, module in self.model.named_modules():
            # a weight masked before lives under ``parametrizations``, not ``_parameters``: list both to mask it again
            names = list(module._parameters) + list(getattr(module, "parametrizations", {}).keys())
            for attr in dict.fromkeys(names):
                fqn = f"{path}.{attr}" if path else attr
                if self.targets is None:
                    picked = is_weighted(module) and attr == "weight"  # the op registry's weighted layers
                else:
                    picked = any(fnmatch.fnmatchcase(fqn, pattern) for pattern in self.targets)
                if picked and getattr(module, attr, None) is not None:
                    found.append((fqn, module, attr))
        if not found:
            raise StructPruneError("no tensor to mask: " + ("the model has no Linear/Conv weights; name the "
                                                            "parameters with targets=['name.*']" if self.targets is None
                                                            else f"no parameter matches {list(self.targets)}; check "
                                                                 f"the names in model.named_parameters()"))
        return found

    def scores(self, chosen: List[Target]) -> List[torch.Tensor]:
        """The criterion's element scores of every chosen tensor (higher = keep).

        Weights an earlier mask already removed score zero, the lowest a criterion gives, so a second
        ``sparsify`` (an iterative schedule, a lottery ticket's next round) counts them among the
        ``sparsity`` it removes instead of picking new ones on top of them."""
        found = []
        for fqn, module, attr in chosen:
            score = self.criterion.element_scores(fqn, original(module, attr), self.context)
            mask = existing_mask(module, attr)
            found.append(score if mask is None else score * mask.to(score.dtype))
        return found


class Granularity:
    """A strategy: mask the structures of the requested tensors. Subclasses set ``name``."""

    name = ""
    uses_sparsity = True  # False: the pattern fixes the sparsity (N:M)

    def apply(self, request: MaskRequest) -> SparsityReport:
        raise NotImplementedError


def keep_highest(scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Keep-mask over a 1-D score vector dropping exactly the ``n_drop`` lowest (ties broken by position)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_drop > 0:
        order = torch.argsort(scores, stable=True)
        keep[order[:n_drop]] = False
    return keep


class StructureGranularity(Granularity):
    """Structures are the rows of a reshaped weight; they are ranked per tensor or across tensors."""

    def rows(self, tensor: torch.Tensor, request: MaskRequest) -> Optional[Rows]:
        """``(to_rows, from_rows)``: reshape so that every row is one structure, and back; None if none fit."""
        raise NotImplementedError

    def label(self, request: MaskRequest) -> str:
        return self.name

    def apply(self, request: MaskRequest) -> SparsityReport:
        chosen = request.chosen()
        tensors = [original(module, attr) for _, module, attr in chosen]
        views = [self.rows(t, request) for t in tensors]
        fitting = [(target, view) for target, view in zip(chosen, views) if view is not None]
        if not fitting:
            raise StructPruneError(f"no tensor of the model has {self.name} structures (kernels need conv weights, "
                                   f"vectors a matrix); pick another granularity or other targets=")
        scores = request.scores([target for target, _ in fitting])
        rows = [(target, view, view[0](score)) for (target, view), score in zip(fitting, scores)]
        if request.scope == "local":
            keeps = [keep_highest(self._structure_scores(r, request), round(request.sparsity * r.shape[0]))
                     for _, _, r in rows]
        else:  # global: structures of different sizes are compared by their mean element score
            means = [r.mean(-1) for _, _, r in rows]
            keep_all = keep_highest(torch.cat(means), round(request.sparsity * sum(x.numel() for x in means)))
            keeps = list(keep_all.split([x.numel() for x in means]))
        for ((_, module, attr), view, r), keep in zip(rows, keeps):
            set_mask(module, attr, view[1](keep[:, None].expand(r.shape)), self.label(request))
        return sparsity_report(request.model)

    @staticmethod
    def _structure_scores(rows: torch.Tensor, request: MaskRequest) -> torch.Tensor:
        how = request.criterion.structure
        if how == "root_sum":
            return rows.sum(-1).sqrt()
        return rows.mean(-1) if how == "mean" else rows.sum(-1)


class Element(StructureGranularity):
    name = "element"

    def rows(self, tensor: torch.Tensor, request: MaskRequest) -> Optional[Rows]:
        shape = tensor.shape
        return (lambda x: x.reshape(-1, 1)), (lambda r: r.reshape(shape))


class Vector(StructureGranularity):
    """Whole rows (an output neuron's weights) or columns (an input's weights) of a weight matrix."""

    name = "vector"

    def rows(self, tensor: torch.Tensor, request: MaskRequest) -> Optional[Rows]:
        shape = tensor.shape
        if tensor.ndim < 2:
            return None
        if request.axis == "row":
            return (lambda x: x.reshape(shape[0], -1)), (lambda r: r.reshape(shape))
        return (lambda x: x.reshape(shape[0], -1).t()), (lambda r: r.t().reshape(shape))

    def label(self, request: MaskRequest) -> str:
        return f"vector ({request.axis})"


class Kernel(StructureGranularity):
    """Whole k x k kernels of a convolution weight."""

    name = "kernel"

    def rows(self, tensor: torch.Tensor, request: MaskRequest) -> Optional[Rows]:
        shape = tensor.shape
        if tensor.ndim < 3:
            return None  # no kernels in a matrix
        return (lambda x: x.reshape(shape[0] * shape[1], -1)), (lambda r: r.reshape(shape))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M keep-mask maximising the kept score in every run of ``m`` weights along dim 1 (the
    input dimension): every one of the C(m, n) patterns is scored and the best taken, per run."""
    if not 0 < n < m:
        raise InvalidOptionError(f"N:M needs 0 < n < m, got n={n}, m={m}; pass e.g. n=2, m=4")
    if scores.ndim < 2 or scores.shape[1] % m:
        raise InvalidOptionError(f"N:M needs a weight whose input dimension is a multiple of m={m}, "
                                 f"got {tuple(scores.shape)}")
    moved = scores.movedim(1, -1)
    runs = moved.reshape(-1, m)
    patterns = torch.tensor([[1.0 if i in combo else 0.0 for i in range(m)]
                             for combo in itertools.combinations(range(m), n)], dtype=runs.dtype, device=runs.device)
    # one matmul scores every run against every pattern (C(4, 2) = 6): exact, no greedy top-n per run
    best = (runs @ patterns.t()).argmax(dim=1)
    return patterns[best].reshape(moved.shape).movedim(-1, 1).bool()


class NM(Granularity):
    """At most N non-zero weights in every run of M along the input dimension (sparse tensor cores)."""

    name = "nm"
    uses_sparsity = False

    def apply(self, request: MaskRequest) -> SparsityReport:
        n = check_integer("n", request.n, low=1, example="n=2, m=4")
        m = check_integer("m", request.m, low=2, example="n=2, m=4")
        if not n < m:
            raise InvalidOptionError(f"N:M needs 0 < n < m, got n={n}, m={m}; pass e.g. n=2, m=4")
        chosen = request.chosen()
        fits = [c for c in chosen if original(c[1], c[2]).ndim >= 2 and original(c[1], c[2]).shape[1] % m == 0]
        if not fits:
            raise StructPruneError(f"no weight has an input dimension that is a multiple of m={m}")
        for (fqn, module, attr), score in zip(fits, request.scores(fits)):
            set_mask(module, attr, nm_mask(score, n, m), f"{n}:{m}")
        report = sparsity_report(request.model)
        report.skipped = [fqn for fqn, _, _ in chosen if fqn not in {c[0] for c in fits}]
        return report


_GRANULARITIES: Dict[str, Granularity] = {}


def register_granularity(strategy: Granularity) -> Granularity:
    """Make ``strategy`` available as ``sparsify(..., granularity=strategy.name)``."""
    if not isinstance(strategy, Granularity) or not isinstance(strategy.name, str) or not strategy.name:
        raise InvalidOptionError(f"register_granularity takes a Granularity instance with a name, e.g. "
                                 f"register_granularity(MyGranularity()); got {strategy!r}")
    _GRANULARITIES[strategy.name] = strategy
    return strategy


def list_granularities() -> List[str]:
    """Names of the registered granularities, finest first."""
    return list(_GRANULARITIES)


def get_granularity(name: str) -> Granularity:
    return _GRANULARITIES[check_choice("granularity", name, list_granularities())]


def check_axis(axis: str) -> str:
    return check_choice("axis", axis, VECTOR_AXES)


for _strategy in (Element(), NM(), Vector(), Kernel()):
    register_granularity(_strategy)
