#!/usr/bin/env python3
"""Turn the JSON written by ``engine_speed.py --json`` into docs/benchmarks.md.

    python benchmarks/engine_speed.py --all --size 224 --repeats 3 --threads 1 --json benchmarks/results/engine_speed_224.json
    python benchmarks/engine_speed_report.py benchmarks/results/engine_speed_224.json --commit <sha> > docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import math


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_path")
    parser.add_argument("--commit", default="(not recorded)", help="library commit the run measured")
    args = parser.parse_args()
    data = json.load(open(args.json_path))
    results, run = data["results"], data["args"]
    both = [r for r in results if r.get("speedup")]
    valid = [r for r in both if r["torch_pruning"]["status"] == "ok"]
    mobile = sorted(r["speedup"] for r in both)
    densenets = [r["speedup"] for r in both if r["model"].startswith("densenet")]
    not_less = all(r["structprune"]["removed"] >= r["torch_pruning"]["removed"] - 1e-9 for r in valid)
    out = [
        "# Benchmarks", "",
        f"Measured with `python benchmarks/engine_speed.py --all --size {run['size']} --repeats {run['repeats']} "
        f"--threads {run['threads']} --json {args.json_path}` on the project's 2-core CPU machine (torch 2.14.1, "
        "torchvision 0.29.1, Torch-Pruning 1.6.1), ratio "
        f"{run['ratio']}, random weights, input 1x3x{run['size']}x{run['size']} (ViT/MaxViT need 224). For every "
        "model and repeat the two tools prune freshly built copies, interleaved and alternating which runs first; "
        f"the table shows medians of {run['repeats']}. `structprune` time is `slim(model, x, ratio, verify=False)` "
        "*including* its deep copy; Torch-Pruning time is `BasePruner(...)` construction (its dependency graph) "
        "plus `step()`, pruning in place with the final classifier ignored. Library code measured: commit "
        f"{args.commit}. Raw results: [{args.json_path}](../{args.json_path}).", "",
        f"**Geometric mean speed-up (Torch-Pruning time / structprune time): {geomean([r['speedup'] for r in both]):.2f}x "
        f"over the {len(both)} models both tools finished; {geomean([r['speedup'] for r in valid]):.2f}x over the "
        f"{len(valid)} where Torch-Pruning's result also runs.** The smallest ratios are the small mobile networks "
        f"({mobile[0]:.2f}x at the lowest), where fixed costs (fx tracing, the deep copy) dominate; the largest are "
        f"the DenseNets ({min(densenets):.0f}-{max(densenets):.0f}x), where Torch-Pruning's dependency-group search "
        "dominates.", "",
        "Parameters removed: structprune removes " + ("at least as many parameters as" if not_less else
                                                       "a comparable number of parameters to")
        + " Torch-Pruning on every model where Torch-Pruning's result runs, and also prunes the models where it "
          "fails (ShuffleNet, Swin, ViT, MaxViT).", "",
        "| model | structprune s | Torch-Pruning s | speed-up | structprune removed | TP removed | Torch-Pruning status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    fmt = lambda x, f: "-" if x is None else f.format(x)  # noqa: E731
    for r in results:
        o, t = r["structprune"], r["torch_pruning"]
        out.append(f"| {r['model']} | {fmt(o['median_s'], '{:.3f}')} | {fmt(t['median_s'], '{:.3f}')} | "
                   f"{fmt(r.get('speedup'), '{:.2f}x')} | {fmt(o['removed'], '{:.1%}')} | "
                   f"{fmt(t['removed'], '{:.1%}')} | {t['status'][:90]} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
