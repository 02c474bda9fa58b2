"""Before and after: a printable comparison of an original model and its pruned version.

    rep = sp.report(model, small, x)   # parameters, MACs, latency, and every layer's width
    print(rep)
    rep.plot("widths.png")             # per-layer widths before/after (matplotlib)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from torch import nn

from ..ops.registry import width_of
from ..options import check_flag, require_module
from .metrics import count_macs, count_parameters, latency_ms

PLOT_ROW_IN, PLOT_MARGIN_IN, PLOT_FONT_PT = 0.2, 1.6, 8  # Report.plot: inches per layer, inches of axes/title, font


@dataclass
class Report:
    """Sizes and speed before and after, plus ``layers``: ``(name, width before, width after)``."""

    params: Tuple[int, int]
    macs: Tuple[Optional[int], Optional[int]]
    latency_ms: Tuple[Optional[float], Optional[float]]
    layers: List[Tuple[str, int, int]] = field(default_factory=list)

    def __str__(self) -> str:
        def row(label, before, after, fmt):
            if before is None or after is None:
                return f"{label:<10} {'n/a':>14} {'n/a':>14}"
            change = f"{after / before:8.2f}x" if before else ""
            return f"{label:<10} {fmt(before):>14} {fmt(after):>14} {change}"

        lines = [f"{'':<10} {'before':>14} {'after':>14}",
                 row("params", *self.params, lambda v: f"{v:,}"),
                 row("MACs", *self.macs, lambda v: f"{v:,}"),
                 row("latency", *self.latency_ms, lambda v: f"{v:.2f} ms")]
        changed = [layer for layer in self.layers if layer[1] != layer[2]]
        lines.append(f"{len(changed)} of {len(self.layers)} layers narrower:")
        width = max([len(name) for name, _, _ in changed] + [5])
        lines += [f"  {name:<{width}} {before:>6} -> {after:<6}" for name, before, after in changed]
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Save a chart of every layer's width before and after: one horizontal bar per layer, in model
        order from the top, labelled with the layer's name. The figure grows with the number of layers
        (a row per layer), so every name stays readable at a constant size, a ResNet-50's as well as a
        small model's; width axes on top and bottom keep a tall chart readable anywhere."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [name for name, _, _ in self.layers]
        rows = max(len(names), 1)
        fig, ax = plt.subplots(figsize=(8.0, PLOT_MARGIN_IN + PLOT_ROW_IN * rows), layout="constrained")
        positions = list(range(len(names)))
        ax.barh(positions, [b for _, b, _ in self.layers], height=0.8, color="#c8c8c8", label="before")
        ax.barh(positions, [a for _, _, a in self.layers], height=0.8, color="tab:blue", label="after")
        ax.set_yticks(positions)
        ax.set_yticklabels(names, fontsize=PLOT_FONT_PT)
        ax.set_ylim(rows - 0.5, -0.5)  # the first layer on top
        ax.tick_params(axis="x", labelsize=PLOT_FONT_PT + 1, top=True, labeltop=True)
        ax.grid(axis="x", color="#e4e4e4")
        ax.set_axisbelow(True)
        ax.set_xlabel("width (channels)", fontsize=PLOT_FONT_PT + 2)
        narrower = sum(before != after for _, before, after in self.layers)
        ax.set_title(f"Layer widths before and after pruning: {narrower} of {len(names)} layers narrower",
                     fontsize=PLOT_FONT_PT + 3)
        fig.legend(loc="outside upper right", ncols=2, fontsize=PLOT_FONT_PT + 1, frameon=False)
        fig.savefig(path, dpi=120)
        plt.close(fig)


def report(original: nn.Module, pruned: nn.Module, example_input: Any, *, latency: bool = True,
           macs: bool = True) -> Report:
    """Compare ``original`` and ``pruned`` on ``example_input`` (latency: median of torch.utils.benchmark)."""
    require_module(original, "original")
    require_module(pruned, "pruned")
    check_flag("latency", latency)
    check_flag("macs", macs)
    before = {name: width_of(m) for name, m in original.named_modules()}
    after = {name: width_of(m) for name, m in pruned.named_modules()}
    layers = [(name, w, w_after) for name, w in before.items()
              if w is not None and (w_after := after.get(name)) is not None]
    return Report(
        params=(count_parameters(original), count_parameters(pruned)),
        macs=(count_macs(original, example_input), count_macs(pruned, example_input)) if macs else (None, None),
        latency_ms=(latency_ms(original, example_input), latency_ms(pruned, example_input)) if latency
        else (None, None),
        layers=layers,
    )
