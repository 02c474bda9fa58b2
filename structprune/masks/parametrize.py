"""The one mask mechanism: a ``torch.nn.utils.parametrize`` parametrization ``weight -> weight * mask``.

Every granularity (and lottery tickets' element masks) registers its masks here, so
:func:`sparsity_report`, :func:`remove_masks` and :func:`apply_masks` see them all. Training keeps
the zeros (the effective weight is recomputed every forward); :func:`remove_masks` bakes them in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..options import require_module
from ..surgery.copying import deep_copy_module


class Mask(nn.Module):
    """Parametrization ``weight -> weight * mask``; ``granularity`` says how the mask was made."""

    mask: torch.Tensor  # a buffer

    def __init__(self, mask: torch.Tensor, granularity: str):
        super().__init__()
        self.register_buffer("mask", mask)
        self.granularity = granularity

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def parametrization_list(module: nn.Module, attr: str) -> parametrize.ParametrizationList:
    """The parametrizations of ``module.attr`` (which must be parametrized)."""
    return getattr(module.parametrizations, attr)


def original(module: nn.Module, attr: str) -> torch.Tensor:
    """The unmasked tensor (under an existing parametrization, its original)."""
    if parametrize.is_parametrized(module, attr):
        return parametrization_list(module, attr).original
    return getattr(module, attr)


def existing_mask(module: nn.Module, attr: str) -> Optional[torch.Tensor]:
    """The mask already on ``module.attr`` (None when it has none)."""
    if not parametrize.is_parametrized(module, attr):
        return None
    return next((p.mask for p in getattr(module.parametrizations, attr) if isinstance(p, Mask)), None)


def set_mask(module: nn.Module, attr: str, mask: torch.Tensor, granularity: str) -> None:
    """Register (or tighten) the mask of ``module.attr``: an existing mask is AND-ed with the new one."""
    mask = mask.to(dtype=original(module, attr).dtype, device=original(module, attr).device)
    if parametrize.is_parametrized(module, attr):
        for p in parametrization_list(module, attr):
            if isinstance(p, Mask):
                # tighten in place rather than stack a second Mask: the report and remove_masks expect one per tensor
                p.mask.mul_(mask)
                p.granularity = granularity
                return
    parametrize.register_parametrization(module, attr, Mask(mask, granularity))


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
    require_module(model)
    report = SparsityReport()
    for path, module in model.named_modules():
        for attr, plist in getattr(module, "parametrizations", {}).items():
            found = [p for p in plist if isinstance(p, Mask)]
            if found:
                weight = getattr(module, attr)
                report.rows.append((f"{path}.{attr}" if path else attr, tuple(weight.shape), found[-1].granularity,
                                    weight.numel(), int((weight == 0).sum())))
    return report


def masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every mask of ``model`` by fully-qualified tensor name."""
    found: Dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        for attr, plist in getattr(module, "parametrizations", {}).items():
            for p in plist:
                if isinstance(p, Mask):
                    found[f"{path}.{attr}" if path else attr] = p.mask
    return found


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight (zeros stay zeros) and drop the parametrizations."""
    require_module(model)
    for module in list(model.modules()):
        for attr in list(getattr(module, "parametrizations", {}).keys()):
            # parametrizations the user added (weight_norm, orthogonal) stay: baking them would change their behaviour
            if all(isinstance(p, Mask) for p in getattr(module.parametrizations, attr)):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parametrized tensors are plain parameters holding their effective
    (masked) values. torch's ``remove_parametrizations`` is not used on the copy: copies share the
    injected ``Parametrized...`` class with the original, and removing edits that class."""
    twin = deep_copy_module(model)
    for module in twin.modules():
        if parametrize.is_parametrized(module):
            names = list(cast(nn.ModuleDict, module.parametrizations))
            effective = {attr: getattr(module, attr).detach().clone() for attr in names}
            grads = {attr: parametrization_list(module, attr).original.requires_grad for attr in effective}
            del module._modules["parametrizations"]
            module.__class__ = module.__class__.__bases__[0]  # the class before parametrization
            for attr, value in effective.items():
                module._parameters[attr] = nn.Parameter(value, requires_grad=grads[attr])
    return twin
