#!/usr/bin/env python3
"""Importance criteria, local and global scope: accuracy of pruned 1-D CNNs on MNIST-1D.

For every seed a small 1-D CNN (conv-bn-relu stages, one residual add, global average pooling,
linear head) is trained on MNIST-1D, generated locally with the ``mnist1d`` package
(``make_dataset(get_dataset_args())``; nothing is downloaded). Then, for every criterion x ratio x
scope, a deep copy of the trained model is pruned with

    structprune.slim(model, example_input, ratio, criterion=name, scope=scope,
                     data=calib_batches, verify=False, seed=seed)

and its test accuracy is measured right after pruning ("one-shot") and after a fixed short
fine-tune ("fine-tuned"). A ``slim`` call that raises is recorded with its error message; the
script never stops on one.

Outputs: a markdown report (mean +- std over seeds), a PNG plot and the raw results as JSON.

Examples::

    python benchmarks/criteria.py                 # full run: docs/criteria.md, docs/criteria.png,
                                                  # benchmarks/results/criteria.json
    python benchmarks/criteria.py --quick         # smoke test: 1 seed, ratio 0.5, few epochs,
                                                  # outputs under /tmp unless paths are given
    python benchmarks/criteria.py --threads 2

Needs ``mnist1d`` and ``matplotlib`` (``pip install mnist1d matplotlib``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CRITERIA = ["random", "magnitude", "l1", "l2", "fpgm", "bn_scale", "gradient", "taylor"]
RATIOS = [0.3, 0.5, 0.7]
SCOPES = ["local", "global"]
SEEDS = [0, 1, 2]
MODES = ["one_shot", "fine_tuned"]
MODE_TITLE = {"one_shot": "one-shot", "fine_tuned": "fine-tuned"}

FULL = dict(seeds=SEEDS, ratios=RATIOS, train_epochs=30, finetune_epochs=2)
QUICK = dict(seeds=[0], ratios=[0.5], train_epochs=8, finetune_epochs=1)

BATCH = 128
LR = 1e-3
FINETUNE_LR = 1e-3
CALIB_BATCHES = 8
CALIB_BATCH_SIZE = 64

DEFAULT_OUT = dict(md="docs/criteria.md", png="docs/criteria.png", json="benchmarks/results/criteria.json")
QUICK_OUT = dict(md="/tmp/structprune_criteria_quick.md", png="/tmp/structprune_criteria_quick.png",
                 json="/tmp/structprune_criteria_quick.json")


# ----------------------------------------------------------------------------- data and model


def load_data() -> dict[str, torch.Tensor]:
    """MNIST-1D generated locally (4000 train / 1000 test, length 40, 10 classes)."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG
    data = make_dataset(get_dataset_args())
    np.random.set_state(state)
    return {
        "x_train": torch.as_tensor(np.asarray(data["x"]), dtype=torch.float32).unsqueeze(1),
        "y_train": torch.as_tensor(np.asarray(data["y"]), dtype=torch.long),
        "x_test": torch.as_tensor(np.asarray(data["x_test"]), dtype=torch.float32).unsqueeze(1),
        "y_test": torch.as_tensor(np.asarray(data["y_test"]), dtype=torch.long),
    }


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
                         nn.BatchNorm1d(c_out))


class Net(nn.Module):
    """32-64-64-128 conv-bn-relu stages, one stride-2 downsample, one residual add, GAP, linear."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(1, 32, 5)                 # (B, 32, 40)
        self.down = conv_bn(32, 64, 3, stride=2)      # (B, 64, 20)
        self.block1 = conv_bn(64, 64, 3)              # residual branch
        self.block2 = conv_bn(64, 64, 3)
        self.expand = conv_bn(64, 128, 3)             # (B, 128, 20)
        self.head = nn.Linear(128, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.down(x))
        x = F.relu(x + self.block2(F.relu(self.block1(x))))  # the residual add couples down/block2
        x = F.relu(self.expand(x))
        return self.head(x.mean(dim=-1))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 1000):
        correct += (model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item()
    return correct / len(x)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    """Adam, batch 128, reshuffled every epoch from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1)) if epochs > 2 else None
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
    model.eval()


def calibration_batches(x: torch.Tensor, y: torch.Tensor, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(10_000 + seed))
    return [(x[perm[i * CALIB_BATCH_SIZE:(i + 1) * CALIB_BATCH_SIZE]], y[perm[i * CALIB_BATCH_SIZE:(i + 1) * CALIB_BATCH_SIZE]])
            for i in range(CALIB_BATCHES)]


# ----------------------------------------------------------------------------- experiment


def short_error(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}"


def run_one(base: nn.Module, data: dict[str, torch.Tensor], calib: list, criterion: str, ratio: float,
            scope: str, seed: int, finetune_epochs: int, params_base: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"seed": seed, "criterion": criterion, "ratio": ratio, "scope": scope}
    model = copy.deepcopy(base).eval()
    example_input = data["x_train"][:8]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        import structprune  # imported here so that a half-edited library is recorded, not fatal

        pruned = structprune.slim(model, example_input, ratio, criterion=criterion, scope=scope, data=calib,
                                  verify=False, seed=seed)
    except Exception as exc:  # noqa: BLE001 - the library is being extended; record and go on
        rec["error"] = short_error(exc)
        rec["slim_s"] = time.perf_counter() - t0
        return rec
    rec["slim_s"] = time.perf_counter() - t0
    try:
        params = count_params(pruned)
        rec["params"] = params
        rec["params_removed"] = params_base - params
        rec["params_removed_frac"] = (params_base - params) / params_base
        rec["one_shot"] = accuracy(pruned, data["x_test"], data["y_test"])
        t1 = time.perf_counter()
        train(pruned, data["x_train"], data["y_train"], finetune_epochs, FINETUNE_LR, seed=20_000 + seed)
        rec["finetune_s"] = time.perf_counter() - t1
        rec["fine_tuned"] = accuracy(pruned, data["x_test"], data["y_test"])
    except Exception as exc:  # noqa: BLE001 - a pruned model that fails to run is a result too
        rec["error"] = "pruned model failed: " + short_error(exc)
    return rec


def library_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "structprune"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes to structprune/" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


# ----------------------------------------------------------------------------- summaries


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_values(runs: list[dict], criterion: str, ratio: float, scope: str, key: str) -> tuple[list[float], list[str]]:
    vals, errs = [], []
    for r in runs:
        if r["criterion"] == criterion and r["ratio"] == ratio and r["scope"] == scope:
            if key in r:
                vals.append(r[key])
            elif "error" in r:
                errs.append(r["error"])
    return vals, errs


def fmt_pct(vals: list[float], n_seeds: int, err_ref: str | None) -> str:
    if not vals:
        return f"error {err_ref}" if err_ref else "—"
    m, s = mean_std([100 * v for v in vals])
    text = f"{m:.1f} ± {s:.1f}" if n_seeds > 1 else f"{m:.1f}"
    if len(vals) < n_seeds:
        text += f" ({len(vals)}/{n_seeds} seeds)"
    return text


def error_refs(runs: list[dict]) -> tuple[dict[str, str], list[tuple[str, str, list[str]]]]:
    """Number every distinct error message; map message -> label and list (label, message, where)."""
    labels: dict[str, str] = {}
    where: dict[str, set] = {}
    for r in runs:
        if "error" in r:
            labels.setdefault(r["error"], f"[E{len(labels) + 1}]")
            where.setdefault(r["error"], set()).add(f"{r['criterion']}/{r['scope']}")
    return labels, [(labels[m], m, sorted(where[m])) for m in labels]


def first_error_label(runs: list[dict], labels: dict[str, str], criterion: str, ratio: float, scope: str) -> str | None:
    _, errs = cell_values(runs, criterion, ratio, scope, "one_shot")
    return labels[errs[0]] if errs else None


def paired_vs_random(runs: list[dict], criterion: str, ratio: float, scope: str, mode: str) -> list[float]:
    """Per-seed differences (accuracy points) between ``criterion`` and random on the same base model."""
    by = {(r["seed"], r["criterion"]): r for r in runs
          if r["ratio"] == ratio and r["scope"] == scope and mode in r}
    return [100 * (by[(s, criterion)][mode] - by[(s, "random")][mode])
            for (s, c) in by if c == criterion and (s, "random") in by]


def verdict(runs: list[dict], criteria: list[str], ratio: float, scopes: list[str]) -> list[str]:
    lines = []
    for scope in scopes:
        beat, lose, missing = [], [], []
        base, _ = cell_values(runs, "random", ratio, scope, "fine_tuned")
        if not base:
            lines.append(f"- **{scope} scope:** no comparison possible: the random criterion has no result "
                         f"at ratio {ratio}.")
            continue
        for c in criteria:
            if c == "random":
                continue
            diffs = paired_vs_random(runs, c, ratio, scope, "fine_tuned")
            if not diffs:
                missing.append(c)
                continue
            m, s = mean_std(diffs)
            wins = sum(d > 0 for d in diffs)
            spread = f" ± {s:.1f}" if len(diffs) > 1 else ""
            text = f"{c} ({m:+.1f}{spread} points, ahead in {wins}/{len(diffs)} seeds)"
            (beat if m > 0 else lose).append((m, text))
        beat.sort(key=lambda t: -t[0])
        lose.sort(key=lambda t: -t[0])
        parts = [f"- **{scope} scope:** random reaches {fmt_pct(base, len(base), None)}%."]
        parts.append(" Beat random: " + ("; ".join(t for _, t in beat) if beat else "none") + ".")
        if lose:
            parts.append(" Did not beat random: " + "; ".join(t for _, t in lose) + ".")
        if missing:
            parts.append(" No result (slim raised): " + ", ".join(missing) + ".")
        lines.append("".join(parts))
    return lines


def observations(runs: list[dict], criteria: list[str], ratios: list[float], scopes: list[str],
                 params_base: int) -> list[str]:
    """Two facts computed from the results that qualify the tables."""
    out = []
    best = None
    for c in criteria:
        for s in scopes:
            for r in ratios:
                vals, _ = cell_values(runs, c, r, s, "one_shot")
                if vals and (best is None or statistics.fmean(vals) > best[0]):
                    best = (statistics.fmean(vals), c, s, r)
    if best is not None:
        out.append(f"One-shot (no fine-tuning, no BatchNorm recalibration), the best mean accuracy of any "
                   f"criterion is {100 * best[0]:.1f}% ({best[1]}, {best[2]} scope, ratio {best[3]}).")
    if "global" in scopes:
        spans = []
        for r in ratios:
            means = [statistics.fmean(v) for c in criteria
                     for v in [cell_values(runs, c, r, "global", "params_removed")[0]] if v]
            if means:
                spans.append(f"{100 * min(means) / params_base:.1f}-{100 * max(means) / params_base:.1f}% at "
                             f"ratio {r}")
        if spans:
            out.append("Under global scope the ratio is a fraction of channels, so the parameters removed depend "
                       "on which channels a criterion picks (" + "; ".join(spans) + "): global comparisons "
                       "are not at exactly equal parameter budgets.")
    return [" ".join(out), ""] if out else []


def display_path(path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return os.path.abspath(path) if rel.startswith("..") else rel


def write_markdown(path: str, res: dict[str, Any], command: str, png_path: str, json_path: str) -> None:
    runs, cfg = res["runs"], res["config"]
    criteria, ratios, scopes, seeds = cfg["criteria"], cfg["ratios"], cfg["scopes"], cfg["seeds"]
    n = len(seeds)
    labels, errors = error_refs(runs)
    base_acc = [b["test_acc"] for b in res["base"]]
    bm, bs = mean_std([100 * a for a in base_acc])
    params_base = res["base"][0]["params"]
    pm = "mean ± std over" if n > 1 else "single run,"
    lines = [
        "# Importance criteria: local and global scope",
        "",
        f"A small 1-D CNN ({params_base:,} parameters: conv-bn-relu stages 32-64-64-128, one stride-2 "
        "downsample, one residual add coupling the 64-channel stages, global average pooling, linear head) is "
        f"trained on MNIST-1D ({cfg['n_train']} train / {cfg['n_test']} test sequences of length 40, generated "
        "locally by `mnist1d.data.make_dataset(get_dataset_args())`) with Adam, batch "
        f"{BATCH}, lr {LR} (cosine), {cfg['train_epochs']} epochs, once per seed. For every criterion x ratio x "
        "scope a deep copy of the trained model is pruned with `structprune.slim(model, x_train[:8], ratio, "
        f"criterion=..., scope=..., data=calib, verify=False, seed=seed)`, where `calib` is {CALIB_BATCHES} "
        f"(input, target) batches of {CALIB_BATCH_SIZE} training samples (used by `gradient` and `taylor` with "
        "the default cross-entropy loss). Test accuracy is measured right after pruning (*one-shot*) and "
        f"after {cfg['finetune_epochs']} epoch(s) of Adam (lr {FINETUNE_LR}, batch {BATCH}) on the training set "
        f"(*fine-tuned*). Cells are test accuracy in %, {pm} seeds {', '.join(map(str, seeds))}; "
        "the same trained model per seed is shared by all criteria, so differences between criteria are paired.",
        "",
        f"Reproduce: `{command}` (wall time of this run: {res['wall_s'] / 60:.1f} min, {cfg['threads']} "
        f"thread(s), torch {res['env']['torch']}). Library code measured: {res['env']['structprune_commit']}. "
        f"Raw results: [{display_path(json_path)}]({os.path.relpath(os.path.abspath(json_path), os.path.dirname(os.path.abspath(path)))}).",
        "",
        f"**Unpruned baseline: {bm:.1f}{f' ± {bs:.1f}' if n > 1 else ''}% test accuracy** "
        f"(per seed: {', '.join(f'{100 * a:.1f}' for a in base_acc)}).",
        "",
        f"**Which criteria beat random at ratio {max(ratios)} after fine-tuning** (mean paired difference in "
        "accuracy points ± std over seeds):",
        "",
    ]
    lines += verdict(runs, criteria, max(ratios), scopes)
    lines.append("")
    lines += observations(runs, criteria, ratios, scopes, params_base)
    if cfg["quick"] or n < len(SEEDS) or len(ratios) < len(RATIOS):
        lines += ["*This is a reduced smoke-test run (fewer seeds, ratios or epochs than the full experiment); "
                  "do not read anything into the numbers.*", ""]

    def table(cell) -> list[str]:
        """One row per criterion, one column per (scope, ratio); ``cell(criterion, ratio, scope)``."""
        rows = ["| criterion | " + " | ".join(f"{s} {r}" for s in scopes for r in ratios) + " |",
                "| --- |" + " ---: |" * (len(scopes) * len(ratios))]
        rows += [f"| {c} | " + " | ".join(cell(c, r, s) for s in scopes for r in ratios) + " |" for c in criteria]
        return rows + [""]

    for mode in MODES:
        lines += [f"## {MODE_TITLE[mode].capitalize()} accuracy (%)", ""]
        lines += table(lambda c, r, s, mode=mode: fmt_pct(cell_values(runs, c, r, s, mode)[0], n,
                                                         first_error_label(runs, labels, c, r, s)))

    lines += ["## Parameters removed", "",
              f"Out of {params_base:,}; mean over seeds (local scope removes the same channels count from every "
              "group, so its counts do not depend on the criterion; global scope does).", ""]

    def removed(c, r, s) -> str:
        vals, _ = cell_values(runs, c, r, s, "params_removed")
        if vals:
            m = statistics.fmean(vals)
            return f"{m:,.0f} ({100 * m / params_base:.1f}%)"
        label = first_error_label(runs, labels, c, r, s)
        return f"error {label}" if label else "—"

    lines += table(removed)

    if errors:
        lines += ["## Errors", "", "`slim` (or the pruned model) raised for these criterion/scope combinations; "
                  "the message is recorded verbatim in the JSON.", ""]
        for label, msg, where in errors:
            short = msg if len(msg) <= 400 else msg[:400] + " …"
            lines.append(f"- **{label}** ({', '.join(where)}): `{short}`")
        lines.append("")

    png = os.path.relpath(os.path.abspath(png_path), os.path.dirname(os.path.abspath(path)))
    lines += ["## Plot", "", f"![accuracy vs ratio]({png})", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, cfg = res["runs"], res["config"]
    criteria, ratios, scopes = cfg["criteria"], cfg["ratios"], cfg["scopes"]
    base = 100 * statistics.fmean(b["test_acc"] for b in res["base"])
    fig, axes = plt.subplots(len(scopes), len(MODES), figsize=(11, 8), sharex=True, squeeze=False)
    markers = "os^vD<>xP*"
    for i, scope in enumerate(scopes):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            ax.axhline(base, color="k", ls=":", lw=1, label="unpruned")
            for k, c in enumerate(criteria):
                xs, ms, ss = [], [], []
                for r in ratios:
                    vals, _ = cell_values(runs, c, r, scope, mode)
                    if vals:
                        m, s = mean_std([100 * v for v in vals])
                        # a small horizontal offset per criterion keeps overlapping error bars readable
                        xs.append(r + 0.006 * (k - (len(criteria) - 1) / 2)), ms.append(m), ss.append(s)
                if xs:
                    ax.errorbar(xs, ms, yerr=ss, marker=markers[k % len(markers)], capsize=3, lw=1.5,
                                ls="--" if c == "random" else "-", color="k" if c == "random" else None, label=c)
            ax.set_title(f"{scope} scope, {MODE_TITLE[mode]}")
            ax.set_xticks(ratios)
            ax.grid(alpha=0.3)
            if i == len(scopes) - 1:
                ax.set_xlabel("pruning ratio")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for row in axes:
        for ax in row:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in labels:
                    handles.append(h), labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    n = len(cfg["seeds"])
    fig.suptitle(f"MNIST-1D 1-D CNN: accuracy after structprune.slim (mean ± std over {n} seed(s))")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, ratio 0.5, few epochs")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--criteria", default=",".join(CRITERIA), help="comma-separated criterion names")
    p.add_argument("--md", help="markdown report path (default docs/criteria.md; /tmp for --quick)")
    p.add_argument("--png", help="plot path (default docs/criteria.png; /tmp for --quick)")
    p.add_argument("--json", help="raw results path (default benchmarks/results/criteria.json; /tmp for --quick)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg_run = dict(QUICK if args.quick else FULL)
    out = QUICK_OUT if args.quick else {k: os.path.join(REPO, v) for k, v in DEFAULT_OUT.items()}
    paths = {k: getattr(args, k) or out[k] for k in out}
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    command = "python " + " ".join(["benchmarks/criteria.py"] + (argv if argv is not None else sys.argv[1:]))

    t_start = time.perf_counter()
    data = load_data()
    config = dict(criteria=criteria, scopes=SCOPES, threads=torch.get_num_threads(), quick=args.quick,
                  n_train=len(data["x_train"]), n_test=len(data["x_test"]), batch=BATCH, lr=LR,
                  finetune_lr=FINETUNE_LR, calib_batches=CALIB_BATCHES, calib_batch_size=CALIB_BATCH_SIZE,
                  **cfg_run)
    env = dict(torch=torch.__version__, python=platform.python_version(), structprune_commit=library_commit())
    print(f"# torch {env['torch']}, threads {config['threads']}, library {env['structprune_commit']}, "
          f"seeds {config['seeds']}, ratios {config['ratios']}, train {config['train_epochs']} ep, "
          f"fine-tune {config['finetune_epochs']} ep")

    base_results, runs = [], []
    for seed in config["seeds"]:
        torch.manual_seed(seed)
        model = Net()
        t0 = time.perf_counter()
        train(model, data["x_train"], data["y_train"], config["train_epochs"], LR, seed=seed)
        train_s = time.perf_counter() - t0
        acc = accuracy(model, data["x_test"], data["y_test"])
        params = count_params(model)
        base_results.append(dict(seed=seed, test_acc=acc, train_acc=accuracy(model, data["x_train"], data["y_train"]),
                                 params=params, train_s=train_s))
        print(f"seed {seed}: base test acc {100 * acc:.1f}% ({params:,} params, trained in {train_s:.1f}s)")
        calib = calibration_batches(data["x_train"], data["y_train"], seed)
        for scope in SCOPES:
            for criterion in criteria:
                for ratio in config["ratios"]:
                    rec = run_one(model, data, calib, criterion, ratio, scope, seed, config["finetune_epochs"],
                                  params)
                    runs.append(rec)
                    if "error" in rec:
                        print(f"  {scope:<6} {criterion:<9} {ratio:.1f}  ERROR {rec['error'][:200]}")
                    else:
                        print(f"  {scope:<6} {criterion:<9} {ratio:.1f}  one-shot {100 * rec['one_shot']:5.1f}%  "
                              f"fine-tuned {100 * rec['fine_tuned']:5.1f}%  removed "
                              f"{100 * rec['params_removed_frac']:4.1f}% params  (slim {rec['slim_s']:.2f}s)")

    wall = time.perf_counter() - t_start
    res = dict(config=config, env=env, wall_s=wall, base=base_results, runs=runs)
    os.makedirs(os.path.dirname(os.path.abspath(paths["json"])), exist_ok=True)
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(paths["md"], res, command, paths["png"], paths["json"])
    try:
        write_plot(paths["png"], res)
    except Exception as exc:  # noqa: BLE001 - the tables matter more than the picture
        print(f"plot failed: {short_error(exc)}")
    print(f"wall time {wall:.0f}s; wrote {paths['md']}, {paths['png']}, {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
