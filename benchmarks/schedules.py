#!/usr/bin/env python3
"""How often and when to prune: schedules and timings compared on MNIST-1D at 70 % of channels removed.

Every method gets the same total training budget (``--epochs``, default 30 epochs of Adam on the
4000 MNIST-1D training sequences, generated locally) and ends with a model whose channels are 70 %
fewer in every prunable layer (local scope, L2 criterion unless stated):

* one-shot: dense training (2/3 of the budget), prune once, fine-tune (1/3);
* iterative, linear / cubic: dense training (2/3), then 5 steps of prune + fine-tune (1/3 in all);
* soft pruning: the whole budget with ``SoftPruner.update()`` after every epoch, then ``finalize()``;
* Network Slimming: dense training with ``regularizer("bn_l1")`` (2/3), prune by ``bn_scale``,
  fine-tune (1/3);
* lottery ticket: remember the initial weights, dense training (2/3), prune by L1 and rewind the
  survivors to their initial values, retrain (1/3);
* random pruning at initialisation: prune the untrained network (``criterion="random"``), train (all);
* re-initialised: the one-shot architecture, randomly re-initialised and trained (all).

Three seeds; test accuracy mean +- std: the markdown table is printed, the plot saved as
docs/schedules.png and the raw results as benchmarks/results/schedules.json.

    python benchmarks/schedules.py [--epochs 30] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

from criteria import BATCH, Net, accuracy, count_params, load_data  # noqa: E402  (same data and network)

import structprune as sp  # noqa: E402

RATIO = 0.7
STEPS = 5
NS_STRENGTH = 1e-4
METHODS = ["one-shot", "iterative (linear)", "iterative (cubic)", "soft pruning", "Network Slimming",
           "lottery ticket (rewind to init)", "random pruning at init", "pruned architecture, re-initialised"]


def fit(model, data, epochs: int, seed: int, on_epoch: Optional[Callable] = None,
        penalty: Optional[Callable] = None) -> None:
    """Adam (lr 1e-3, cosine), batch 128; ``on_epoch()`` after every epoch; ``penalty(model)`` added to the loss."""
    if epochs <= 0:
        return
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    x, y = data["x_train"], data["y_train"]
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if on_epoch is not None:
            on_epoch()
    model.eval()


def run(method: str, data, seed: int, epochs: int) -> dict:
    torch.manual_seed(seed)
    x = data["x_train"][:8]
    dense_epochs, tune_epochs = (2 * epochs) // 3, epochs - (2 * epochs) // 3
    model = Net().eval()
    if method == "one-shot":
        fit(model, data, dense_epochs, seed)
        model = sp.slim(model, x, RATIO, verify=False)
        fit(model, data, tune_epochs, seed + 1)
    elif method.startswith("iterative"):
        curve = "cubic" if "cubic" in method else "linear"
        fit(model, data, dense_epochs, seed)
        per_step = [tune_epochs // STEPS + (1 if k < tune_epochs % STEPS else 0) for k in range(STEPS)]
        pruner = sp.Pruner(model, x, RATIO, schedule=sp.Iterative(STEPS, curve), verify=False)
        model = pruner.run(lambda p, step: fit(p.model, data, per_step[step.index - 1], seed + step.index))
    elif method == "soft pruning":
        soft = sp.SoftPruner(model, x, RATIO)
        fit(model, data, epochs, seed, on_epoch=soft.update)
        model = soft.finalize()
    elif method == "Network Slimming":
        fit(model, data, dense_epochs, seed, penalty=lambda m: sp.regularizer(m, "bn_l1", NS_STRENGTH))
        model = sp.slim(model, x, RATIO, criterion="bn_scale", verify=False)
        fit(model, data, tune_epochs, seed + 1)
    elif method == "lottery ticket (rewind to init)":
        ticket = sp.LotteryTicket(model, x)
        fit(model, data, dense_epochs, seed)
        model = ticket.prune_and_rewind(RATIO, criterion="l1")
        fit(model, data, tune_epochs, seed + 1)
    elif method == "random pruning at init":
        model = sp.slim(model, x, RATIO, criterion="random", seed=seed, verify=False)
        fit(model, data, epochs, seed)
    elif method == "pruned architecture, re-initialised":
        model = sp.slim(model, x, RATIO, verify=False)  # same widths as one-shot (local scope)
        torch.manual_seed(seed + 100)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
        fit(model, data, epochs, seed)
    else:
        raise ValueError(method)
    return {"method": method, "seed": seed, "accuracy": accuracy(model, data["x_test"], data["y_test"]),
            "params": count_params(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--png", default="docs/schedules.png")
    parser.add_argument("--json", default="benchmarks/results/schedules.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data()
    dense = []
    for seed in args.seeds:  # the unpruned reference, trained with the same budget
        torch.manual_seed(seed)
        model = Net()
        fit(model, data, args.epochs, seed)
        dense.append(accuracy(model, data["x_test"], data["y_test"]))
    results, start = [], time.perf_counter()
    for method in METHODS:
        for seed in args.seeds:
            results.append(run(method, data, seed, args.epochs))
            print(results[-1], f"{time.perf_counter() - start:.0f}s", flush=True)
    summary = {"ratio": RATIO, "epochs": args.epochs, "seeds": args.seeds, "dense_accuracy": dense,
               "dense_params": count_params(Net()), "results": results,
               "seconds": round(time.perf_counter() - start, 1)}
    os.makedirs(os.path.dirname(os.path.join(REPO, args.json)), exist_ok=True)
    with open(os.path.join(REPO, args.json), "w") as f:
        json.dump(summary, f, indent=2)
    write_report(summary, os.path.join(REPO, args.png))


def _stats(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_report(summary: dict, png_path: str) -> None:
    """Save the plot and print the markdown table (docs/schedules.md quotes it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for method in METHODS:
        runs = [r for r in summary["results"] if r["method"] == method]
        mean, std = _stats([r["accuracy"] for r in runs])
        rows.append((method, runs[0]["params"], mean, std))
    dense_mean, dense_std = _stats(summary["dense_accuracy"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r[0] for r in rows][::-1], [100 * r[2] for r in rows][::-1], xerr=[100 * r[3] for r in rows][::-1],
            color="tab:blue", alpha=0.8)
    ax.axvline(100 * dense_mean, color="black", linestyle="--", label=f"unpruned ({100 * dense_mean:.1f} %)")
    ax.set_xlabel(f"test accuracy (%), MNIST-1D, {int(100 * summary['ratio'])} % of channels removed, "
                  f"{len(summary['seeds'])} seeds")
    ax.set_xlim(left=max(0, 100 * min(r[2] for r in rows) - 15))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    lines = ["| method | parameters | test accuracy (mean +- std) |", "|---|---|---|",
             f"| unpruned (reference) | {summary['dense_params']:,} | {100 * dense_mean:.1f} +- {100 * dense_std:.1f} % |"]
    lines += [f"| {m} | {p:,} | {100 * a:.1f} +- {100 * s:.1f} % |" for m, p, a, s in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
