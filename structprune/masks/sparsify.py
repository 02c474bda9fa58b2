"""Granularities that keep shapes: masks on weights, from fine-grained to channels.

The chapter's granularities, finest to coarsest: single weights (``"element"``), N:M patterns
(``"nm"``: at most N non-zero in every run of M consecutive weights along the input dimension, the
layout sparse tensor cores read), whole rows or columns of a weight matrix (``"vector"``), whole
k x k kernels (``"kernel"``) and whole channels (``"channel"``, coupled across every layer that
shares them, through the engine's groups). Masks are ``torch.nn.utils.parametrize``
parametrizations: the effective weight is ``weight * mask`` in every forward, so training keeps the
zeros, and :func:`remove_masks` bakes them in. Channel masks become physical pruning with
:func:`apply_masks`; 2:4 masks become torch's semi-structured sparse tensors on CUDA with
:func:`to_semi_structured`. Masked weights are not faster on their own: see docs/masks.md.

    sp.sparsify(model, sparsity=0.5)                                  # fine-grained, local, L1
    sp.sparsify(model, granularity="nm", n=2, m=4)
    sp.sparsify(model, sparsity=0.3, granularity="channel", example_input=x, scope="global")
    print(sp.sparsity_report(model))
"""
from __future__ import annotations

import fnmatch
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..surgery.copying import deep_copy_module
from ..scoring.criteria import ScoringContext, default_loss, get_criterion
from ..errors import StructPruneError, VerificationError
from ..graph.dependency_graph import DependencyGraph
from ..planning.planner import Plan, PlanOptions, Planner
from ..surgery.shrink import shrunk_copy

GRANULARITIES = ("element", "nm", "vector", "kernel", "channel")
CRITERIA = ("l1", "l2", "magnitude", "gradient", "taylor", "random")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Mask(nn.Module):
    """Parametrization ``weight -> weight * mask``; ``granularity`` says how the mask was made."""

    def __init__(self, mask: torch.Tensor, granularity: str):
        super().__init__()
        self.register_buffer("mask", mask)
        self.granularity = granularity

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


# ---- which tensors --------------------------------------------------------------------------------------------
def _targets(model: nn.Module, targets: Optional[Sequence[str]]) -> List[Tuple[str, nn.Module, str]]:
    """``(fully-qualified name, owner module, attribute)`` of every tensor to mask: the weights of
    Linear/Conv layers by default, or the parameters whose names match ``targets`` (globs)."""
    found = []
    for path, module in model.named_modules():
        names = list(module._parameters) + list(getattr(module, "parametrizations", {}).keys())
        for attr in dict.fromkeys(names):
            fqn = f"{path}.{attr}" if path else attr
            if targets is None:
                chosen = isinstance(module, _LAYERS) and attr == "weight"
            else:
                chosen = any(fnmatch.fnmatchcase(fqn, pattern) for pattern in targets)
            if chosen and getattr(module, attr, None) is not None:
                found.append((fqn, module, attr))
    if not found:
        raise StructPruneError("no tensor to mask: the model has no Linear/Conv weights"
                               + ("" if targets is None else f" matching {list(targets)}"))
    return found


def _original(module: nn.Module, attr: str) -> torch.Tensor:
    """The unmasked tensor (under an existing parametrization, its original)."""
    if parametrize.is_parametrized(module, attr):
        return getattr(module.parametrizations, attr).original
    return getattr(module, attr)


def _set_mask(module: nn.Module, attr: str, mask: torch.Tensor, granularity: str) -> None:
    """Register (or tighten) the mask of ``module.attr``: an existing mask is AND-ed with the new one."""
    mask = mask.to(dtype=_original(module, attr).dtype, device=_original(module, attr).device)
    if parametrize.is_parametrized(module, attr):
        for p in getattr(module.parametrizations, attr):
            if isinstance(p, Mask):
                p.mask.mul_(mask)
                p.granularity = granularity
                return
    parametrize.register_parametrization(module, attr, Mask(mask, granularity))


# ---- scores -----------------------------------------------------------------------------------------------------
def _gradient_sums(model: nn.Module, tensors: List[torch.Tensor], data: Optional[Iterable],
                   loss_fn: Optional[Callable], taylor: bool) -> List[torch.Tensor]:
    if data is None:
        raise StructPruneError("gradient criteria need data=... (calibration batches) and, unless batches are "
                               "(inputs, targets) pairs, loss_fn=lambda model, batch: ...")
    loss_fn = loss_fn or default_loss
    sums = [torch.zeros_like(t) for t in tensors]
    for batch in data:
        grads = torch.autograd.grad(loss_fn(model, batch), tensors, allow_unused=True)
        for total, g, t in zip(sums, grads, tensors):
            if g is not None:
                total += (g * t).abs() if taylor else g.abs()
    return sums


def _element_scores(model, tensors, criterion, data, loss_fn, seed) -> List[torch.Tensor]:
    if criterion in ("l1", "magnitude"):
        return [t.detach().abs() for t in tensors]
    if criterion == "l2":
        return [t.detach().pow(2) for t in tensors]
    if criterion in ("gradient", "taylor"):
        return _gradient_sums(model, tensors, data, loss_fn, taylor=criterion == "taylor")
    if criterion == "random":
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        return [torch.rand(t.shape, generator=gen).to(t.device) for t in tensors]
    raise ValueError(f"criterion must be one of {CRITERIA}, not {criterion!r}")


def _structure_scores(scores: torch.Tensor, criterion: str) -> torch.Tensor:
    """Aggregate element scores over each structure (last axis): L1 sums |w|, L2 takes sqrt of sum w^2,
    magnitude averages |w|; gradient sums go by sum."""
    if criterion == "l2":
        return scores.sum(-1).sqrt()
    if criterion == "magnitude":
        return scores.mean(-1)
    return scores.sum(-1)


# ---- structures -------------------------------------------------------------------------------------------------
def _structures(t: torch.Tensor, granularity: str, axis: str) -> Optional[Tuple[Callable, Callable]]:
    """``(to_rows, from_rows)``: reshape a tensor so that every row is one structure, and back."""
    shape = t.shape
    if granularity == "element":
        return (lambda x: x.reshape(-1, 1)), (lambda r: r.reshape(shape))
    if granularity == "vector":
        if t.ndim < 2:
            return None
        if axis == "row":
            return (lambda x: x.reshape(shape[0], -1)), (lambda r: r.reshape(shape))
        if axis == "column":
            return (lambda x: x.reshape(shape[0], -1).t()), (lambda r: r.t().reshape(shape))
        raise ValueError(f"axis must be 'row' or 'column', not {axis!r}")
    if granularity == "kernel":
        if t.ndim < 3:
            return None  # no kernels in a matrix
        return (lambda x: x.reshape(shape[0] * shape[1], -1)), (lambda r: r.reshape(shape))
    raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")


def _lowest(scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Keep-mask over a 1-D score vector dropping exactly the ``n_drop`` lowest (ties broken by position)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_drop > 0:
        order = torch.argsort(scores, stable=True)
        keep[order[:n_drop]] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M keep-mask maximising the kept score in every run of ``m`` weights along dim 1 (the
    input dimension): every one of the C(m, n) patterns is scored and the best taken, per run."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < n < m, got n={n}, m={m}")
    if scores.ndim < 2 or scores.shape[1] % m:
        raise ValueError(f"N:M needs a weight whose input dimension is a multiple of m={m}, got {tuple(scores.shape)}")
    moved = scores.movedim(1, -1)
    runs = moved.reshape(-1, m)
    patterns = torch.tensor([[1.0 if i in combo else 0.0 for i in range(m)]
                             for combo in itertools.combinations(range(m), n)], dtype=runs.dtype, device=runs.device)
    best = (runs @ patterns.t()).argmax(dim=1)
    return patterns[best].reshape(moved.shape).movedim(-1, 1).bool()


# ---- the public functions ---------------------------------------------------------------------------------------
def sparsify(model: nn.Module, sparsity: float = 0.5, granularity: str = "element", *, n: int = 2, m: int = 4,
             axis: str = "row", scope: str = "local", criterion: str = "l1", data: Optional[Iterable] = None,
             loss_fn: Optional[Callable] = None, example_input: Any = None, targets: Optional[Sequence[str]] = None,
             seed: Optional[int] = None, **channel_options) -> "SparsityReport":
    """Mask ``model`` in place at ``granularity`` and return its :func:`sparsity_report`.

    ``sparsity`` is the fraction of structures (weights, vectors, kernels, channels) masked: in
    every tensor (``scope="local"``) or across all of them, lowest scores first
    (``scope="global"``; structures are compared by their mean score so sizes do not matter).
    ``"nm"`` ignores it (N:M fixes it at (m - n) / m). ``criterion``: l1, l2, magnitude, gradient,
    taylor (gradients from ``data`` and ``loss_fn``) or random. ``targets``: globs of parameter
    names to mask instead of the Linear/Conv weights. ``"channel"`` needs ``example_input`` and
    masks every tensor that shares the channels (the next layer's inputs, norms, biases);
    ``channel_options`` are the planning options of :func:`structprune.slim` (``ignore``,
    ``ratios``, ``round_to``, ``hidden``...).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', not {scope!r}")
    if granularity != "nm" and not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if granularity == "channel":
        _sparsify_channels(model, sparsity, scope, criterion, data, loss_fn, example_input, seed, channel_options)
        return sparsity_report(model)
    chosen = _targets(model, targets)
    tensors = [_original(module, attr) for _, module, attr in chosen]
    scores = _element_scores(model, tensors, criterion, data, loss_fn, seed)
    if granularity == "nm":
        fits = [(c, score) for c, score in zip(chosen, scores) if score.ndim >= 2 and score.shape[1] % m == 0]
        if not fits:
            raise StructPruneError(f"no weight has an input dimension that is a multiple of m={m}")
        for (fqn, module, attr), score in fits:
            _set_mask(module, attr, nm_mask(score, n, m), f"{n}:{m}")
        report = sparsity_report(model)
        report.skipped = [fqn for fqn, _, _ in chosen if fqn not in {c[0] for c, _ in fits}]
        return report
    views = [_structures(t, granularity, axis) for t in tensors]
    rows = [(c, view, s) for c, view, s in zip(chosen, views, scores) if view is not None]
    if not rows:
        raise StructPruneError(f"no tensor of the model has {granularity} structures")
    label = granularity if granularity != "vector" else f"vector ({axis})"
    if scope == "local":
        for (fqn, module, attr), view, score in rows:
            structure = _structure_scores(view[0](score), criterion)
            keep = _lowest(structure, round(sparsity * structure.numel()))
            _set_mask(module, attr, view[1](keep[:, None].expand(view[0](score).shape)), label)
        return sparsity_report(model)
    # global: structures of different sizes are compared by their mean element score
    means = [view[0](score).mean(-1) for _, view, score in rows]
    keep_all = _lowest(torch.cat(means), round(sparsity * sum(x.numel() for x in means)))
    start = 0
    for ((fqn, module, attr), view, score), mean in zip(rows, means):
        keep = keep_all[start:start + mean.numel()]
        start += mean.numel()
        _set_mask(module, attr, view[1](keep[:, None].expand(view[0](score).shape)), label)
    return sparsity_report(model)


def _sparsify_channels(model, sparsity, scope, criterion, data, loss_fn, example_input, seed, options) -> None:
    if example_input is None:
        raise StructPruneError("channel masks need example_input=... to find which channels are coupled")
    graph = DependencyGraph(model, example_input)
    context = ScoringContext(model, graph, data=data, loss_fn=loss_fn, seed=seed)
    ignore = options.pop("ignore", ())
    plan = Planner(graph, context, get_criterion(criterion), ignore).plan(PlanOptions(sparsity, scope, **options))
    dropped = plan.element_mask(graph)
    for space in graph.state.spaces:
        gone = space.of(dropped)
        path, _, attr = space.tensor.rpartition(".")
        module = model.get_submodule(path)
        if not gone.any() or not (attr in module._parameters or parametrize.is_parametrized(module, attr)):
            continue  # buffers (running statistics) need no mask: the affine parameters zero the channel
        shape = [1] * _original(module, attr).ndim
        shape[space.dim] = space.size
        keep = torch.as_tensor(~gone).reshape(shape).expand(_original(module, attr).shape)
        _set_mask(module, attr, keep, "channel")


@dataclass
class SparsityReport:
    """Per masked tensor: name, shape, granularity, size and zeros of the effective weight."""

    rows: List[Tuple[str, Tuple[int, ...], str, int, int]] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # tensors the granularity does not fit (left dense)

    @property
    def total(self) -> float:
        """Fraction of zeros over the masked tensors."""
        size = sum(r[3] for r in self.rows)
        return sum(r[4] for r in self.rows) / max(size, 1)

    def by_granularity(self) -> Dict[str, float]:
        out: Dict[str, List[int]] = {}
        for _, _, granularity, size, zeros in self.rows:
            acc = out.setdefault(granularity, [0, 0])
            acc[0] += size
            acc[1] += zeros
        return {g: zeros / max(size, 1) for g, (size, zeros) in out.items()}

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [6])
        lines = [f"{'tensor':<{width}}  {'shape':<18} {'granularity':<14} {'sparsity':>8}"]
        for name, shape, granularity, size, zeros in self.rows:
            lines.append(f"{name:<{width}}  {str(tuple(shape)):<18} {granularity:<14} {zeros / max(size, 1):>8.1%}")
        parts = ", ".join(f"{g} {s:.1%}" for g, s in self.by_granularity().items())
        lines.append(f"total: {self.total:.1%} of {sum(r[3] for r in self.rows):,} masked-tensor weights ({parts})")
        if self.skipped:
            lines.append("left dense (the granularity does not fit their shape): " + ", ".join(self.skipped))
        return "\n".join(lines)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Sparsity of every masked tensor of ``model`` (zeros of the effective, masked weight)."""
    report = SparsityReport()
    for path, module in model.named_modules():
        for attr, plist in getattr(module, "parametrizations", {}).items():
            masks = [p for p in plist if isinstance(p, Mask)]
            if masks:
                weight = getattr(module, attr)
                report.rows.append((f"{path}.{attr}" if path else attr, tuple(weight.shape), masks[-1].granularity,
                                    weight.numel(), int((weight == 0).sum())))
    return report


def masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every mask of ``model`` by fully-qualified tensor name."""
    found = {}
    for path, module in model.named_modules():
        for attr, plist in getattr(module, "parametrizations", {}).items():
            for p in plist:
                if isinstance(p, Mask):
                    found[f"{path}.{attr}" if path else attr] = p.mask
    return found


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight (zeros stay zeros) and drop the parametrizations."""
    for module in list(model.modules()):
        for attr in list(getattr(module, "parametrizations", {}).keys()):
            if all(isinstance(p, Mask) for p in getattr(module.parametrizations, attr)):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model


def apply_masks(model: nn.Module, example_input: Any) -> nn.Module:
    """A physically smaller copy of a channel-masked ``model``: every channel whose slices are masked
    in every parameter that shares it is removed (through the engine's groups), other masks are baked
    in. The copy's outputs equal the masked model's (checked; :class:`VerificationError` otherwise)."""
    twin = _baked_copy(model)
    graph = DependencyGraph(twin, example_input)
    params = dict(twin.named_parameters(remove_duplicate=False))
    drops = {}
    for group in graph.prunable_groups:
        zero = np.ones(group.n_units, bool)
        seen = False
        for space, index in zip(group.spaces, group.unit_index):
            tensor = params.get(space.tensor)
            if tensor is None:
                continue
            seen = True
            nonzero = tensor.detach().ne(0).movedim(space.dim, 0).reshape(space.size, -1).any(1).cpu().numpy()
            alive = np.zeros(group.n_units, bool)
            np.logical_or.at(alive, index, nonzero)
            zero &= ~alive
        units = np.flatnonzero(zero & ~group.frozen_units)
        if seen and units.size and group.exact and units.size < group.n_units:
            drops[group.id] = units
    dropped = Plan(drops).element_mask(graph)
    small = shrunk_copy(twin, graph, dropped, graph.notes)
    _check_same(model, small, example_input)
    return small


def _baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parametrized tensors are plain parameters holding their effective
    (masked) values. torch's ``remove_parametrizations`` is not used on the copy: copies share the
    injected ``Parametrized...`` class with the original, and removing edits that class."""
    twin = deep_copy_module(model)
    for module in twin.modules():
        if parametrize.is_parametrized(module):
            effective = {attr: getattr(module, attr).detach().clone() for attr in module.parametrizations}
            grads = {attr: module.parametrizations[attr].original.requires_grad for attr in effective}
            del module._modules["parametrizations"]
            module.__class__ = module.__class__.__bases__[0]  # the class before parametrization
            for attr, value in effective.items():
                module._parameters[attr] = nn.Parameter(value, requires_grad=grads[attr])
    return twin


def _check_same(reference: nn.Module, small: nn.Module, example_input: Any) -> None:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        ref, out = reference(*args), small(*args)
    if not torch.allclose(ref, out, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item())):
        raise VerificationError(f"the pruned copy differs from the masked model by {(ref - out).abs().max().item():.3g}")


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Turn every 2:4-masked ``nn.Linear`` weight into ``torch.sparse.to_sparse_semi_structured`` (in
    place; masks are baked first). Needs the weights on a CUDA GPU with sparse tensor cores (Ampere or
    newer); elsewhere it warns and leaves the dense masked model as it is."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight")
               and any(isinstance(p, Mask) and p.granularity == "2:4" for p in m.parametrizations.weight)]
    if not linears:
        raise StructPruneError("no Linear weight carries a 2:4 mask: call sparsify(model, granularity='nm', n=2, m=4)")
    if not all(m.parametrizations.weight.original.is_cuda for m in linears):
        warnings.warn("semi-structured 2:4 sparse tensors need the weights on a CUDA GPU (Ampere or newer); "
                      "the model stays dense with its 2:4 masks (correct, but not faster)", stacklevel=2)
        return model
    from torch.sparse import to_sparse_semi_structured

    for module in linears:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return model
