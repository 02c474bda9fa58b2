#!/usr/bin/env python3
"""Faster where it runs, on a CPU: default widths never slower than dense, and latency targets that land.

For ResNet-50, ViT-B/16 (torchvision, random weights, one 224x224 image) and a LLaMA-architecture
config (one sequence of 128 tokens), with ``--threads`` threads:

1. **Default options at ratios 0.1 ... 0.8**: latency of the pruned model over the dense one, for
   the default ``round_to="auto"`` and for exact widths (``round_to=None``), with the MAC ratio, so
   the realised fraction of the MAC reduction can be read off.
2. **Latency targets** ``{"latency": f}`` for f = 0.3, 0.5, 0.7: the measured latency over dense
   against the promised ``1 - f`` (within 5%), and the parameters kept.
3. **The HALP effect** at f = 0.5: the parameters uniform pruning (local scope) keeps at the latency
   the latency-aware plan measured (bisection on the ratio, interpolated between the two ratios
   that bracket it), against the parameters the plan keeps.

Latency ratios come from alternating dense/pruned timings (``structprune.tools.timing.paired_ratio``:
the ratio of each model's fastest block, settled to 1%), so a ratio compares two models measured side
by side. Results: ``benchmarks/results/cpu_latency.json``.

    python benchmarks/cpu_latency.py [--models resnet50,vit_b_16,llama] [--threads 2] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Dict, List

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import structprune as sp  # noqa: E402
from structprune.tools.metrics import count_macs, count_parameters  # noqa: E402
from structprune.tools.timing import paired_ratio, time_forward  # noqa: E402

RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
TARGETS = [0.3, 0.5, 0.7]


def build(name: str):
    import torchvision

    torch.manual_seed(0)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=8000)
        return LlamaForCausalLM(config).eval(), torch.randint(0, 8000, (1, 128))
    return torchvision.models.get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224)


def latency_ratio(pruned: nn.Module, dense: nn.Module, x, pairs: int) -> float:
    """Pruned / dense from alternating timings (the ratio of their fastest blocks, settled to 1%)."""
    return paired_ratio(pruned, dense, (x,), pairs=pairs, precision=0.01)


def uniform_at_latency(model: nn.Module, x, goal: float, pairs: int) -> Dict[str, float]:
    """The local-scope ratio whose pruned model runs in ``goal`` of the dense latency (bisection), and
    the parameters it keeps: interpolated between the two measured ratios that bracket the goal, since
    heads make uniform pruning a staircase that no ratio may hit exactly."""
    low, high = 0.0, 0.95
    seen = [(0.0, 1.0, 1.0)]  # (ratio, latency ratio, params kept)
    for _ in range(7):
        ratio = (low + high) / 2
        small = sp.slim(model, x, ratio, verify=False)
        measured = latency_ratio(small, model, x, pairs)
        seen.append((ratio, measured, count_parameters(small) / count_parameters(model)))
        low, high = (ratio, high) if measured > goal else (low, ratio)
    slower = max((s for s in seen if s[1] > goal), key=lambda s: s[0])
    faster = min((s for s in seen if s[1] <= goal), key=lambda s: s[0], default=None)
    if faster is None:
        return {"ratio": slower[0], "latency_ratio": slower[1], "params_kept": slower[2], "measured": seen}
    weight = (slower[1] - goal) / max(slower[1] - faster[1], 1e-12)
    return {"ratio": slower[0] + weight * (faster[0] - slower[0]), "latency_ratio": goal,
            "params_kept": slower[2] + weight * (faster[2] - slower[2]), "measured": seen}


def run_model(name: str, args) -> Dict:
    model, x = build(name)
    params, macs = count_parameters(model), count_macs(model, x)
    row: Dict = {"model": name, "params": params, "macs": macs,
                 "dense_ms": 1000 * time_forward(model, (x,), repeats=5, min_time=0.2), "ratios": [], "targets": []}
    print(f"\n{name}: {params / 1e6:.1f} M params, dense {row['dense_ms']:.1f} ms", flush=True)
    for ratio in ([] if args.no_sweep else (args.ratios or RATIOS)):
        entry: Dict = {"ratio": ratio}
        for label, round_to in (("auto", "auto"), ("exact", None)):
            small = sp.slim(model, x, ratio, round_to=round_to, verify=False)
            entry[label] = {"latency_ratio": latency_ratio(small, model, x, args.pairs),
                            "mac_ratio": count_macs(small, x) / macs,
                            "params_kept": count_parameters(small) / params}
        row["ratios"].append(entry)
        a, e = entry["auto"], entry["exact"]
        print(f"  ratio {ratio:.1f}: auto {a['latency_ratio']:.3f}x latency ({a['mac_ratio']:.3f}x MACs)  "
              f"exact {e['latency_ratio']:.3f}x ({e['mac_ratio']:.3f}x MACs)"
              f"{'  SLOWER THAN DENSE' if a['latency_ratio'] > 1 else ''}", flush=True)
    for fraction in (args.targets or TARGETS):
        start = time.perf_counter()
        try:
            small = sp.slim(model, x, target={"latency": fraction}, verify=False)
        except sp.StructPruneError as error:
            row["targets"].append({"target": fraction, "error": str(error)})
            print(f"  latency {fraction}: {error}")
            continue
        seconds = time.perf_counter() - start
        measured = latency_ratio(small, model, x, args.pairs)
        goal = 1 - fraction
        entry = {"target": fraction, "goal_latency_ratio": goal, "latency_ratio": measured,
                 "relative_miss": measured / goal - 1, "params_kept": count_parameters(small) / params,
                 "mac_ratio": count_macs(small, x) / macs, "plan_seconds": seconds}
        if fraction == 0.5 and not args.quick:
            entry["uniform_at_same_latency"] = uniform_at_latency(model, x, measured, args.pairs)
        row["targets"].append(entry)
        extra = ""
        if "uniform_at_same_latency" in entry:
            u = entry["uniform_at_same_latency"]
            extra = (f"; uniform ratio {u['ratio']:.3f} at {u['latency_ratio']:.3f}x keeps "
                     f"{u['params_kept']:.1%} params")
        print(f"  latency {fraction}: {measured:.3f}x dense (goal {goal:.2f}, miss {entry['relative_miss']:+.1%}), "
              f"keeps {entry['params_kept']:.1%} params, planned in {seconds:.0f} s{extra}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_b_16,llama")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8, help="alternating dense/pruned timings per ratio, at least")
    parser.add_argument("--ratios", type=lambda s: [float(v) for v in s.split(",")], default=None)
    parser.add_argument("--targets", type=lambda s: [float(v) for v in s.split(",")], default=None)
    parser.add_argument("--quick", action="store_true", help="skip the uniform-ratio bisection")
    parser.add_argument("--no-sweep", action="store_true", help="only the latency targets")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "cpu_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: Dict = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                     "cpu": platform.processor() or platform.machine(), "threads": args.threads, "models": []}
    models: List[str] = args.models.split(",")
    for name in models:
        results["models"].append(run_model(name, args))
        with open(args.json, "w") as f:  # after every model: an interrupted run keeps what it measured
            json.dump(results, f, indent=2)
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
