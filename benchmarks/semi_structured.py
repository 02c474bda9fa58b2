#!/usr/bin/env python3
"""Dense vs 2:4 semi-structured sparse Linear layers on a CUDA GPU.

Two workloads, fp16, timed with ``torch.utils.benchmark`` (median of its adaptive repeats), dense and
2:4 side by side in one run:

* one Linear, 4096 -> 4096, on a (batch, 4096) input;
* a transformer MLP block (LLaMA-7B sizes: 4096 -> 11008, SiLU, 11008 -> 4096).

The 2:4 masks come from ``structprune.sparsify(model, granularity="nm", n=2, m=4)`` and the weights
are converted with ``structprune.to_semi_structured`` (``torch.sparse.to_sparse_semi_structured``).
Sparse tensor cores need an NVIDIA GPU of the Ampere generation or newer. Without CUDA the script
says so and measures nothing: masked weights on a CPU are not faster, only sparser.

    python benchmarks/semi_structured.py [--batch 4096] [--json benchmarks/results/semi_structured.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn


def mlp(hidden: int, inner: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, inner, bias=False), nn.SiLU(), nn.Linear(inner, hidden, bias=False))


def median_ms(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.benchmark import Timer

    with torch.no_grad():
        return 1000 * Timer("model(x)", globals={"model": model, "x": x}).blocked_autorange(min_run_time=1.0).median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device here: 2:4 semi-structured kernels need an NVIDIA GPU (Ampere or newer). "
              "Nothing was measured; on CPU a 2:4-masked model is exactly as fast as the dense one.")
        return 0
    import structprune as sp

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        print(f"{name} predates sparse tensor cores (compute capability {major}.x < 8.0); nothing measured.")
        return 0
    torch.manual_seed(0)
    results = {"device": name, "torch": torch.__version__, "batch": args.batch, "rows": []}
    workloads = {"Linear 4096x4096": lambda: nn.Sequential(nn.Linear(4096, 4096, bias=False)),
                 "MLP 4096-11008-4096": lambda: mlp(4096, 11008)}
    for label, build in workloads.items():
        dense = build().half().to(device).eval()
        sparse = build().half().to(device).eval()
        sparse.load_state_dict(dense.state_dict())
        sp.sparsify(sparse, granularity="nm", n=2, m=4)
        x = torch.randn(args.batch, 4096, dtype=torch.half, device=device)
        with torch.no_grad():
            masked_out = sparse(x)
        sp.to_semi_structured(sparse)
        with torch.no_grad():
            error = (sparse(x) - masked_out).abs().max().item()
        dense_ms, sparse_ms = median_ms(dense, x), median_ms(sparse, x)
        row = {"workload": label, "dense_ms": dense_ms, "sparse_2_4_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
               "max_abs_diff_vs_masked": error}
        results["rows"].append(row)
        print(f"{label:22s} dense {dense_ms:8.3f} ms  2:4 {sparse_ms:8.3f} ms  speedup {dense_ms / sparse_ms:5.2f}x  "
              f"(|2:4 - masked dense| <= {error:.2g})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
