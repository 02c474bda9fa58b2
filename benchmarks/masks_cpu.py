#!/usr/bin/env python3
"""Are masked weights faster on a CPU? Dense vs masked (parametrized) vs masked-and-baked Linear layers.

A 1024 -> 4096 -> 1024 MLP on a (256, 1024) input, fp32, every granularity at 50 % (2:4 for N:M),
timed with ``torch.utils.benchmark`` (median), all variants in one run. Zeros in a dense tensor do
not skip any arithmetic, so baked masks run at dense speed and live masks add a multiply per forward.

    python benchmarks/masks_cpu.py
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.benchmark import Timer

import structprune as sp


def median_ms(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return 1000 * Timer("model(x)", globals={"model": model, "x": x}).blocked_autorange(min_run_time=0.5).median


def main() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()
    x = torch.randn(256, 1024)
    median_ms(dense, x)  # warm-up: the first timed model would otherwise pay for it
    base = median_ms(dense, x)
    print(f"{'variant':34s} {'ms':>8s} {'vs dense':>9s}")
    print(f"{'dense':34s} {base:8.2f} {1.0:8.2f}x")
    for label, kwargs in [("element 50 %", dict(sparsity=0.5)), ("2:4", dict(granularity="nm")),
                          ("vector rows 50 %", dict(sparsity=0.5, granularity="vector"))]:
        masked = copy.deepcopy(dense)
        sp.sparsify(masked, **kwargs)
        live = median_ms(masked, x)
        baked = median_ms(sp.remove_masks(masked), x)
        print(f"{label + ', masks live':34s} {live:8.2f} {live / base:8.2f}x")
        print(f"{label + ', masks baked':34s} {baked:8.2f} {baked / base:8.2f}x")
    small = sp.slim(dense, x, 0.5)
    pruned = median_ms(small, x)
    print(f"{'channels 50 %, physically removed':34s} {pruned:8.2f} {pruned / base:8.2f}x")
    again = median_ms(dense, x)
    print(f"{'dense again (noise check)':34s} {again:8.2f} {again / base:8.2f}x")


if __name__ == "__main__":
    main()
