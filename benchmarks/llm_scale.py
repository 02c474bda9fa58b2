"""How the cost of layer-by-layer pruning grows with model size: LLaMA-shaped checkpoints of 0.2B to 8B.

For each size, writes a random bfloat16 checkpoint (sharded safetensors, the shapes of the Llama-3
family; weights N(0, 0.02), norms 1) into a work folder, then prunes it with
``sp.prune_pretrained`` in a fresh process (20% of the parameters, FLAP, 8 calibration sequences of
128 tokens, layer-by-layer verification on) and records wall time, peak resident memory, and bytes
read and written. For the sizes that fit, the same prune by in-memory ``slim`` (``from_pretrained``
then ``slim``) is measured beside it. The pruned folder is checked with ``from_pretrained`` on the meta
device (config and shapes), and the smallest sizes generate text with their KV cache.

    python benchmarks/llm_scale.py --sizes 0.2B,1B,3B,8B --work /tmp/llm_scale \
        --out benchmarks/results/llm_scale.json --plot docs/llm_scale.png [--in-memory 0.2B,1B]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

SIZES = {  # Llama-3-family shapes (Llama-3.2-1B/3B, Llama-3-8B); 0.2B: a small model of the same design
    "0.2B": dict(hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "1B": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3B": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
OPTIONS = dict(target={"params": 0.2}, criterion="flap", hidden=False)


def config_of(size: str):
    from transformers import LlamaConfig
    return LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, dtype="bfloat16", **SIZES[size])


def write_checkpoint(size: str, folder: Path) -> None:
    """A random bfloat16 checkpoint of ``size``, written tensor by tensor (memory: the largest tensor)."""
    import torch

    from structprune.layerwise.skeleton import build_skeleton
    from structprune.layerwise.writer import ShardWriter

    config = config_of(size)
    skeleton = build_skeleton(config, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with ShardWriter(folder, max_shard_bytes=2 * 2 ** 30) as writer:
        for name, meta in skeleton.state_dict().items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            tensor = torch.empty(meta.shape, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                for start in range(0, tensor.shape[0], 8192):  # row blocks: no float32 copy of a large tensor
                    tensor[start:start + 8192].normal_(0.0, 0.02, generator=generator)
            writer.add(name, tensor)
        writer.commit(config=config)


def calibration(vocab: int, samples: int = 8, length: int = 128, batch: int = 4):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (samples, length), generator=generator)
    return list(ids.split(batch))


def io_bytes() -> dict:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"read_bytes": int(fields["read_bytes"]), "write_bytes": int(fields["write_bytes"]),
            "rchar": int(fields["rchar"]), "wchar": int(fields["wchar"])}


def child_streamed(src: Path, out: Path, device: str) -> dict:
    import transformers  # noqa: F401  (imported before the baseline is read: every run pays for it)

    import structprune as sp
    from structprune.layerwise import pretrained  # noqa: F401
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    start, io0 = time.perf_counter(), io_bytes()
    report = sp.prune_pretrained(src, out, data=calibration(vocab), device=device, progress=False, **OPTIONS)
    wall, io1 = time.perf_counter() - start, io_bytes()
    result = {"wall_s": round(wall, 1), "stages_s": {k: round(v, 1) for k, v in report.seconds.items()},
              "params_before": report.params_before, "params_after": report.params_after,
              "removed": round(1 - report.params_after / report.params_before, 4),
              "blocks_verified": len(report.blocks), "blocks_exact": sum(b.exact for b in report.blocks),
              "worst_block_error": max((b.max_relative_error for b in report.blocks), default=0.0),
              "checkpoint_bytes_read": report.bytes_read, "bytes_written": report.bytes_written,
              "disk_read_bytes": io1["read_bytes"] - io0["read_bytes"],
              "disk_write_bytes": io1["write_bytes"] - io0["write_bytes"],
              "rss_after_imports_gib": round(baseline, 2)}
    if device.startswith("cuda"):
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return result


def child_in_memory(src: Path) -> dict:
    from transformers import AutoModelForCausalLM

    import structprune as sp
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).eval()
    batches = calibration(vocab)
    small, report = sp.slim_with_report(model, batches[0], data=batches, **OPTIONS)
    return {"wall_s": round(time.perf_counter() - start, 1), "params_after": report.params_after}


def child_check(out: Path, generate: bool) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from structprune.layerwise.checkpoint import Checkpoint
    from structprune.layerwise.skeleton import Materializer, build_skeleton
    config = AutoConfig.from_pretrained(str(out))
    Materializer(build_skeleton(config, torch.bfloat16), Checkpoint(out)).check_shapes()  # config and shapes, meta
    result = {"config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                         "num_key_value_heads", "head_dim", "mlp_bias")}}
    if generate:
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
        ids = torch.tensor([[1, 2, 3, 4]])
        text = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        result["generated_tokens"] = text[0, 4:].tolist()
    return result


def run_child(*args: str) -> dict:
    """Run this script as a child and return its JSON result with its peak RSS."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.2B,1B")
    parser.add_argument("--in-memory", default="0.2B", help="sizes also pruned by in-memory slim")
    parser.add_argument("--generate", default="0.2B,1B", help="sizes whose result generates text")
    parser.add_argument("--work", type=Path, default=Path("/tmp/structprune-llm-scale"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        kind, *rest = args.child
        result = {"streamed": lambda: child_streamed(Path(rest[0]), Path(rest[1]), rest[2]),
                  "in_memory": lambda: child_in_memory(Path(rest[0])),
                  "write": lambda: write_checkpoint(rest[0], Path(rest[1])) or {},
                  "check": lambda: child_check(Path(rest[0]), rest[1] == "1")}[kind]()
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
        print(json.dumps(result))
        return
    runs = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    args.work.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        src, out = args.work / f"llama-{size}", args.work / f"llama-{size}-pruned"
        shutil.rmtree(out, ignore_errors=True)
        if not src.exists():
            start = time.perf_counter()
            written = run_child("write", size, str(src))
            print(f"{size}: wrote the checkpoint in {time.perf_counter() - start:.0f} s "
                  f"(peak {written['peak_rss_gib']} GiB)", flush=True)
        record = {"config": SIZES[size], "checkpoint_gib": round(sum(
            p.stat().st_size for p in src.glob("*.safetensors")) / 2 ** 30, 2)}
        record["streamed"] = run_child("streamed", str(src), str(out), args.device)
        from structprune.layerwise.checkpoint import Checkpoint
        stored = Checkpoint(src)
        layer = sum(stored.nbytes(k) for k in stored.keys() if k.startswith("model.layers.0.")) / 2 ** 30
        streamed = record["streamed"]
        # what "grows with the largest layer, not with depth" means: peak memory in units of one decoder layer
        streamed["decoder_layer_gib"] = round(layer, 3)
        streamed["peak_rss_in_layers"] = round(streamed["peak_rss_gib"] / layer, 1)
        streamed["peak_above_imports_in_layers"] = round(
            (streamed["peak_rss_gib"] - streamed["rss_after_imports_gib"]) / layer, 1)
        print(size, "streamed", record["streamed"], flush=True)
        record["check"] = run_child("check", str(out), "1" if size in args.generate.split(",") else "0")
        print(size, "check", record["check"], flush=True)
        if size in args.in_memory.split(","):
            record["in_memory"] = run_child("in_memory", str(src))
            print(size, "in memory", record["in_memory"], flush=True)
        record.update(torch=torch.__version__, machine=f"{platform.machine()}, {os.cpu_count()} cores",
                      device=args.device, options=str(OPTIONS), calibration="8 sequences x 128 tokens")
        runs[f"{size}@{args.device}"] = record
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(runs, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    if args.plot:
        plot(runs, args.plot)


def plot(runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cpu = sorted(((r["streamed"]["params_before"] / 1e9, r) for k, r in runs.items() if k.endswith("@cpu")),
                 key=lambda x: x[0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    sizes = [s for s, _ in cpu]
    left.plot(sizes, [r["checkpoint_gib"] for _, r in cpu], "k:", label="checkpoint (bf16)")
    left.plot(sizes, [r["streamed"]["peak_rss_gib"] for _, r in cpu], "o-", label="prune_pretrained peak RSS")
    mem = [(s, r["in_memory"]["peak_rss_gib"]) for s, r in cpu if "in_memory" in r]
    if mem:
        left.plot(*zip(*mem), "s--", label="from_pretrained + slim peak RSS")
    left.set(xlabel="parameters (billions)", ylabel="GiB", title="memory")
    left.legend(fontsize=7)
    right.plot(sizes, [r["streamed"]["wall_s"] / 60 for _, r in cpu], "o-")
    right.set(xlabel="parameters (billions)", ylabel="minutes", title="wall time, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
