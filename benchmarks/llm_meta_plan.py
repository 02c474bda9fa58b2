"""Plan the pruning of a 7B LLaMA-architecture model on the ``meta`` device: no weights are allocated.

Builds ``LlamaForCausalLM`` with the LLaMA-2-7B shapes (and, with ``--gqa``, 8 key/value heads as in
LLaMA-3-8B) under ``torch.device("meta")``, then times the dependency graph and a full ``slim`` with
the ``random`` criterion (magnitude criteria need real weights) and reports the peak resident memory
of this process. The result is a meta model with the pruned shapes: the plan, without the weights.

    python benchmarks/llm_meta_plan.py [--gqa] [--ratio 0.3] [--out benchmarks/results/llm_meta_plan.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import warnings
from pathlib import Path

import torch

import structprune as sp


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def llama_7b(gqa: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8 if gqa else 32,
                         max_position_embeddings=4096)
    with torch.device("meta"):
        return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gqa", action="store_true", help="8 key/value heads instead of 32")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    start = time.perf_counter()
    model = llama_7b(args.gqa)
    built = time.perf_counter() - start
    ids = torch.zeros(1, 32, dtype=torch.long, device="meta")
    params_before = sp.count_parameters(model)

    start = time.perf_counter()
    graph = sp.DependencyGraph(model, (ids,))
    graph_s = time.perf_counter() - start

    start = time.perf_counter()
    small, report = sp.slim_with_report(model, (ids,), args.ratio, criterion="random", seed=0, verify=False)
    slim_s = time.perf_counter() - start

    layer = small.model.layers[0]
    result = {
        "model": f"LlamaForCausalLM, LLaMA-2-7B shapes{' with 8 KV heads' if args.gqa else ''}, meta device",
        "ratio": args.ratio,
        "params_before": params_before,
        "params_after": report.params_after,
        "groups": len(graph.groups),
        "prunable_groups": len(graph.prunable_groups),
        "build_model_s": round(built, 2),
        "dependency_graph_s": round(graph_s, 2),
        "slim_s": round(slim_s, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "pruned_layer0": {"q_proj": list(layer.self_attn.q_proj.weight.shape),
                          "k_proj": list(layer.self_attn.k_proj.weight.shape),
                          "gate_proj": list(layer.mlp.gate_proj.weight.shape)},
        "config": {k: getattr(small.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                         "num_key_value_heads", "head_dim")},
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(args.out.read_text()) if args.out.exists() else {}
        runs["gqa" if args.gqa else "mha"] = result
        args.out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
