#!/usr/bin/env python3
"""Do structurally pruned models run faster on a GPU? structprune and Torch-Pruning, measured honestly.

Three sections (``--only`` picks some), each saved to the JSON after every item, so a run cut short
by a timeout still leaves what it measured:

* ``sweep``: ResNet-50 and ViT-B/16 (torchvision, random weights, batch 256, the CNN in channels_last)
  and a ~0.45B-parameter LLaMA-architecture causal LM (hidden 1024, FFN 4096, 24 layers, 16 heads,
  8 KV heads, vocab 32000; 32 sequences x 128 tokens, logits included), all bf16. At each ratio
  structprune ``slim(model, x, ratio)`` with default options and Torch-Pruning 1.6.1 (``MetaPruner``,
  ``GroupMagnitudeImportance(p=2)``, classifier / lm_head ignored) prune the dense model on a batch-2
  example input (same device and dtype); parameters, MACs (``torch.utils.flop_counter`` on that input),
  and the latency at the big batch are recorded. Latency is ``structprune.tools.timing.time_forward``
  (CUDA-graph replays, median of blocks) with dense and pruned models timed alternately, twice each, at
  every ratio, so the speedup compares numbers taken side by side. ``realised`` = speedup / (dense MACs /
  pruned MACs): the share of the MAC reduction that shows up as speed.
* ``verify``: ``slim(..., 0.5, verify=True)`` on CUDA in float32 (TF32 left at torch's defaults),
  bfloat16 and float16; pass/fail and the message.
* ``latency``: ``slim(model, x, target={"latency": 0.5})`` (the pruned model should take half the dense
  time, within 5%), its latency measured here, and the uniform ratio (local scope, default options) that
  reaches the same measured latency, found by bisection, to compare the parameters each keeps.

Output: ``gpu_speedup_<card>_<date>.json`` and ``.png`` (speedup and realised fraction against the
ratio) in ``$OUT`` if set, else ``benchmarks/results/``; separate ``--only`` runs of one day on one
card merge into the same file.

    python benchmarks/gpu_speedup.py                       # everything (on a GPU)
    python benchmarks/gpu_speedup.py --only sweep --budget-s 230
    python benchmarks/gpu_speedup.py --smoke               # tiny models, batch 2, ratio 0.5, on the CPU
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import signal
import statistics
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import structprune as sp  # noqa: E402
from structprune.tools.timing import _captured, time_forward  # noqa: E402

SECTIONS = ("sweep", "verify", "latency")
MODELS = ("resnet50", "vit_b_16", "llama")
# Coverage order: if the time budget runs out, the ratios done still span the range.
RATIOS = (0.5, 0.2, 0.8, 0.3, 0.6, 0.1, 0.4, 0.7)
LATENCY_TARGET = 0.5  # fraction of the dense latency removed


# ---- settings ----------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes and timing effort of a run: the GPU benchmark, or the tiny CPU smoke test."""

    smoke: bool
    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    image_batch: int = 256
    text_batch: Tuple[int, int] = (32, 128)
    example_batch: int = 2  # what the pruners trace and score with
    ratios: Tuple[float, ...] = RATIOS
    repeats: int = 5
    min_time: float = 0.04
    rounds: int = 2  # alternating timing rounds of dense and pruned
    bisect_steps: int = 6
    budget_s: Optional[float] = None  # per section
    tp_timeout_s: float = 60.0  # Torch-Pruning's grouping can run for many minutes on a LLaMA

    @classmethod
    def make(cls, args: argparse.Namespace) -> "Settings":
        if args.smoke:
            # float32: bf16 kernels on a CPU are slow enough to make even the tiny models crawl
            settings = cls(True, torch.device("cpu"), torch.float32, image_batch=2, text_batch=(2, 16), ratios=(0.5,),
                           repeats=2, min_time=0.005, rounds=1, bisect_steps=2, tp_timeout_s=20.0)
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            settings = cls(False, device)
        if args.ratios:
            settings.ratios = tuple(float(r) for r in args.ratios.split(","))
        settings.budget_s = args.budget_s
        if args.tp_timeout_s:
            settings.tp_timeout_s = args.tp_timeout_s
        return settings


# ---- models ------------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """A dense model on the benchmark device, its inputs, and the layer both pruners must leave whole."""

    name: str
    model: nn.Module
    example: torch.Tensor  # small batch: pruning, MAC counting, verification
    timing: torch.Tensor  # the big batch the latency is measured at
    head: nn.Module  # the classifier / lm_head
    channels_last: bool = False
    info: Dict[str, Any] = field(default_factory=dict)

    def convert(self, model: nn.Module) -> nn.Module:
        """A pruned model in the layout the dense one is timed in."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def _images(batch: int, size: int, settings: Settings, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=generator).to(settings.device, dtype)


def _tokens(batch: int, seq: int, vocab: int, settings: Settings) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(settings.device)


def _vision(name: str, settings: Settings) -> Tuple[nn.Module, int, Callable[[nn.Module], nn.Module]]:
    import torchvision

    if not settings.smoke:
        model = torchvision.models.get_model(name, weights=None)
        return model, 224, (lambda m: m.fc) if name == "resnet50" else (lambda m: m.heads.head)
    if name == "resnet50":
        return torchvision.models.resnet18(weights=None, num_classes=10), 64, lambda m: m.fc
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)
    return vit, 32, lambda m: m.heads.head


def _llama(settings: Settings) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if settings.smoke else \
        dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=8)
    # use_cache=False: no KV cache is built in a prefill-style forward, which also keeps it capturable
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, use_cache=False, **sizes))


def build(name: str, settings: Settings, dtype: torch.dtype) -> Workload:
    """The dense ``name`` model in ``dtype`` on the benchmark device, with its inputs."""
    torch.manual_seed(0)
    with settings.device:  # initialise on the device: a 0.45B model initialises slowly on a CPU
        if name == "llama":
            model: nn.Module = _llama(settings)
            head: Callable[[nn.Module], nn.Module] = lambda m: m.lm_head  # noqa: E731
        else:
            model, size, head = _vision(name, settings)
    model = model.to(settings.device, dtype).eval()
    if name == "llama":
        vocab = model.config.vocab_size
        batch, seq = settings.text_batch
        return Workload(name, model, _tokens(settings.example_batch, seq, vocab, settings),
                        _tokens(batch, seq, vocab, settings), head(model),
                        info={"batch": batch, "sequence": seq, "output": "logits"})
    channels_last = name == "resnet50"
    timing = _images(settings.image_batch, size, settings, dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        timing = timing.contiguous(memory_format=torch.channels_last)
    return Workload(name, model, _images(settings.example_batch, size, settings, dtype), timing, head(model),
                    channels_last, info={"batch": settings.image_batch, "image_size": size,
                                         "channels_last": channels_last})


# ---- pruning -----------------------------------------------------------------------------------------------------
def first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:limit] if text else ''}"


class PruneTimeout(Exception):
    """Torch-Pruning ran past ``Settings.tp_timeout_s``."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`PruneTimeout` in this (main) thread after ``seconds``: Torch-Pruning's dependency
    grouping is pure Python and on a LLaMA it can loop for many minutes, which would eat the GPU budget."""
    def expire(signum: int, frame: Any) -> None:
        raise PruneTimeout(f"gave up after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def slim_default(model: nn.Module, x: Any, **options: Any) -> Tuple[nn.Module, Optional[str]]:
    """``sp.slim`` with default options (verify=True). If only the verification fails, prune again with
    verify=False so the speed can still be measured, and return the verification failure as a note."""
    try:
        return sp.slim(model, x, **options), None
    except sp.VerificationError as error:
        return sp.slim(model, x, verify=False, **options), f"default verify failed: {first_line(error)}"


def prune_structprune(work: Workload, ratio: float) -> Tuple[nn.Module, Optional[str]]:
    return slim_default(work.model, work.example, ratio=ratio)


def prune_torch_pruning(work: Workload, ratio: float) -> Tuple[nn.Module, Optional[str]]:
    """Torch-Pruning 1.6.1 as in benchmarks/speedup.py, but ignoring this workload's own head (that
    script's helper ignores 1000-way Linears only, so it would prune a LLaMA lm_head)."""
    import torch_pruning as tp

    head = next(name for name, module in work.model.named_modules() if module is work.head)
    model = copy.deepcopy(work.model)
    pruner = tp.pruner.MetaPruner(model, work.example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model.get_submodule(head)])
    pruner.step()
    return model, None


PRUNERS: Dict[str, Callable[[Workload, float], Tuple[nn.Module, Optional[str]]]] = {
    "structprune": prune_structprune, "torch-pruning": prune_torch_pruning}


# ---- timing ------------------------------------------------------------------------------------------------------
def latency_ms(model: nn.Module, x: torch.Tensor, settings: Settings) -> float:
    return 1000 * time_forward(model, (x,), repeats=settings.repeats, min_time=settings.min_time)


def interleaved_ms(models: List[nn.Module], x: torch.Tensor, settings: Settings) -> List[float]:
    """Median latency of each model, timed in turn for ``settings.rounds`` rounds (drift hits all alike)."""
    samples: List[List[float]] = [[] for _ in models]
    for _ in range(settings.rounds):
        for i, model in enumerate(models):
            samples[i].append(latency_ms(model, x, settings))
    return [statistics.median(s) for s in samples]


def runs(model: nn.Module, x: torch.Tensor) -> Optional[str]:
    """None if ``model(x)`` runs, else the error (a pruned model that cannot run is a result)."""
    try:
        with torch.no_grad():
            model(x)
        return None
    except Exception as error:  # noqa: BLE001
        return first_line(error)


def graph_capturable(model: nn.Module, x: torch.Tensor) -> Optional[bool]:
    """Whether ``model(x)`` can be captured into a CUDA graph (else time_forward falls back to eager
    timing, which adds launch overhead); None on a CPU."""
    if not x.is_cuda:
        return None
    with torch.no_grad():
        return _captured(lambda: model(x)) is not None


def release(settings: Settings) -> None:
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()


# ---- results -----------------------------------------------------------------------------------------------------
class Results:
    """The JSON file of this card and day: loaded if an earlier ``--only`` run wrote it, rewritten (via a
    temporary file, so a kill never leaves half a file) after every item."""

    def __init__(self, path: str, meta: Dict[str, Any]) -> None:
        self.path = path
        self.data: Dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
        self.data.setdefault("runs", []).append(meta)
        self.data["meta"] = meta

    def section(self, name: str, fresh: Any) -> Any:
        self.data[name] = fresh
        self.save()
        return fresh

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def metadata(settings: Settings) -> Dict[str, Any]:
    import torchvision
    import transformers

    cuda = settings.device.type == "cuda"
    meta: Dict[str, Any] = {
        "card": torch.cuda.get_device_name(settings.device) if cuda else "CPU",
        "torch": torch.__version__, "torchvision": torchvision.__version__, "transformers": transformers.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": settings.smoke,
        "dtype": str(settings.dtype), "image_batch": settings.image_batch, "text_batch": list(settings.text_batch),
        "example_batch": settings.example_batch, "repeats": settings.repeats, "min_time_s": settings.min_time,
        "rounds": settings.rounds, "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "timing": "structprune.tools.timing.time_forward (CUDA graph replays on CUDA), median ms",
        "structprune_options": "defaults (L2, local scope); verify=True, re-run with verify=False only when "
                               "the verification alone fails (noted per row)"}
    try:  # the distribution's version: torch_pruning.__version__ of the 1.6.1 wheel still says 1.6.0
        from importlib.metadata import version
        meta["torch_pruning"] = version("torch-pruning")
    except Exception as error:  # noqa: BLE001
        meta["torch_pruning"] = f"missing: {first_line(error)}"
    return meta


def output_stem(args: argparse.Namespace, meta: Dict[str, Any]) -> str:
    folder = args.out or os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "results")
    return os.path.join(folder, f"gpu_speedup_{slug(meta['card'])}_{meta['date'][:10]}")


def say(row: Dict[str, Any]) -> None:
    """One compact line per result."""
    parts = []
    for key, value in row.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        elif isinstance(value, dict):
            continue
        parts.append(f"{key}={value}")
    print("  ".join(parts), flush=True)


# ---- section: sweep ----------------------------------------------------------------------------------------------
def sweep_ratio(work: Workload, ratio: float, base: Dict[str, Any], settings: Settings,
                gave_up: Dict[str, str]) -> List[Dict[str, Any]]:
    """Both libraries at one ratio: sizes, then latency interleaved with the dense model. A library that
    timed out on this model (``gave_up``: library -> why) is not tried again at later ratios."""
    rows, pruned = [], []
    for library, prune in PRUNERS.items():
        row: Dict[str, Any] = {"model": work.name, "ratio": ratio, "library": library}
        if library in gave_up:
            rows.append({**row, "error": f"skipped: {gave_up[library]}"})
            continue
        start = time.perf_counter()
        try:
            # only Torch-Pruning is cut off: its grouping can loop for many minutes (the step's own timeout
            # bounds everything else)
            limit = settings.tp_timeout_s if library == "torch-pruning" else 1e6
            with warnings.catch_warnings(), time_limit(limit):
                warnings.simplefilter("ignore")
                model, note = prune(work, ratio)
            row["prune_s"] = time.perf_counter() - start
            if note:
                row["note"] = note
            model = work.convert(model)
            row["params"] = sp.count_parameters(model)
            row["macs"] = sp.count_macs(model, work.example)
            row["mac_ratio"] = base["macs"] / row["macs"]
            error = runs(model, work.timing)
            if error:
                row["error"] = f"pruned model fails at the timing batch: {error}"
            else:
                pruned.append((row, model))
        except PruneTimeout as error:
            row["error"] = first_line(error)
            gave_up[library] = f"timed out at ratio {ratio} ({error})"
        except Exception as error:  # noqa: BLE001 - a failing prune is a result
            row["error"] = first_line(error)
        rows.append(row)
    if pruned:
        try:
            dense_ms, *times = interleaved_ms([work.model] + [m for _, m in pruned], work.timing, settings)
            for (row, _), ms in zip(pruned, times):
                row.update(dense_ms=dense_ms, latency_ms=ms, speedup=dense_ms / ms,
                           realised=dense_ms / ms / row["mac_ratio"], slower_than_dense=ms > dense_ms)
        except Exception as error:  # noqa: BLE001
            for row, _ in pruned:
                row["error"] = f"timing failed: {first_line(error)}"
    return rows


def sweep_model(work: Workload, settings: Settings, deadline: float, out: List[Dict[str, Any]],
                save: Callable[[], None]) -> None:
    base: Dict[str, Any] = {"model": work.name, "ratio": 0.0, "library": "dense", **work.info,
                            "params": sp.count_parameters(work.model), "macs": sp.count_macs(work.model, work.example)}
    base["cuda_graph"] = graph_capturable(work.model, work.timing)
    base["latency_ms"] = interleaved_ms([work.model], work.timing, settings)[0]
    out.append(base)
    say(base)
    save()
    gave_up: Dict[str, str] = {}
    for ratio in settings.ratios:
        if time.time() > deadline:
            out.append({"model": work.name, "ratio": ratio, "skipped": "time budget"})
            continue
        for row in sweep_ratio(work, ratio, base, settings, gave_up):
            out.append(row)
            say(row)
        save()
        release(settings)


def summary(rows: List[Dict[str, Any]], model: str) -> str:
    """The model's sweep as a small table: per ratio and library, x fewer MACs, x faster, realised share;
    ``SLOWER`` marks a pruned model slower than the dense one."""
    lines = [f"{model}: ratio | library | MACs / pruned | speedup | realised"]
    for r in sorted((r for r in rows if r.get("model") == model and r.get("library") not in (None, "dense")),
                    key=lambda r: (r["ratio"], r["library"])):
        if "speedup" in r:
            mark = "  SLOWER" if r["slower_than_dense"] else ""
            lines.append(f"  {r['ratio']:.1f} | {r['library']:13s} | {r['mac_ratio']:5.2f}x | {r['speedup']:5.2f}x | "
                         f"{r['realised']:4.0%}{mark}")
        else:
            lines.append(f"  {r['ratio']:.1f} | {r['library']:13s} | {r.get('error', '?')[:100]}")
    return "\n".join(lines)


def run_sweep(settings: Settings, results: Results, models: List[str], plot_stem: str) -> None:
    rows: List[Dict[str, Any]] = results.section("sweep", [])
    start = time.time()
    for i, name in enumerate(models):
        deadline = start + settings.budget_s * (i + 1) / len(models) if settings.budget_s else float("inf")
        try:
            sweep_model(build(name, settings, settings.dtype), settings, deadline, rows, results.save)
        except Exception as error:  # noqa: BLE001
            rows.append({"model": name, "error": first_line(error), "trace": traceback.format_exc(limit=4)})
            say(rows[-1])
        results.save()
        print(summary(rows, name), flush=True)
        plot(rows, plot_stem + ".png", results.data["meta"])
        release(settings)


# ---- section: verify ---------------------------------------------------------------------------------------------
def verify_one(work: Workload, dtype: torch.dtype) -> Dict[str, Any]:
    row: Dict[str, Any] = {"model": work.name, "dtype": str(dtype).replace("torch.", ""), "ratio": 0.5}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, report = sp.slim_with_report(work.model, work.example, 0.5, verify=True)
        verdict = report.verification
        row["passed"] = bool(getattr(verdict, "passed", True))
        for key in ("exact", "max_relative_error", "message"):
            if hasattr(verdict, key):
                row[key] = getattr(verdict, key)
    except sp.VerificationError as error:
        row.update(passed=False, message=first_line(error, 600))
    except Exception as error:  # noqa: BLE001 - something other than the verification broke
        row.update(passed=False, error=first_line(error, 600))
    return row


def run_verify(settings: Settings, results: Results, models: List[str]) -> None:
    rows: List[Dict[str, Any]] = results.section("verify", [])
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for name in models:
        for dtype in dtypes:
            try:
                row = verify_one(build(name, settings, dtype), dtype)
            except Exception as error:  # noqa: BLE001
                row = {"model": name, "dtype": str(dtype), "passed": False, "error": first_line(error)}
            rows.append(row)
            say(row)
            results.save()
            release(settings)


# ---- section: latency target -------------------------------------------------------------------------------------
def latency_target(work: Workload, settings: Settings, limit_s: float) -> Dict[str, Any]:
    """``slim(target={"latency": ...})`` on the timing batch (the latency it should be judged at), given at
    most ``limit_s`` seconds, and its result timed here."""
    entry: Dict[str, Any] = {"target": {"latency": LATENCY_TARGET}}
    try:
        with warnings.catch_warnings(), time_limit(limit_s):
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            model, note = slim_default(work.model, work.timing, target={"latency": LATENCY_TARGET})
            entry["prune_s"] = time.perf_counter() - start
        if note:
            entry["note"] = note
        model = work.convert(model)
        dense, pruned = interleaved_ms([work.model, model], work.timing, settings)
        fraction = pruned / dense
        goal = 1 - LATENCY_TARGET
        entry.update(params=sp.count_parameters(model), dense_ms=dense, latency_ms=pruned, latency_fraction=fraction,
                     within_5_percent=abs(fraction - goal) <= 0.05 * goal, within_5_points=abs(fraction - goal) <= 0.05)
    except Exception as error:  # noqa: BLE001 - the API may not exist yet
        entry["error"] = first_line(error)
    return entry


def bisect_uniform(work: Workload, goal_ms: float, settings: Settings, deadline: float) -> Dict[str, Any]:
    """The uniform ratio (default options, local scope) whose measured latency is closest to ``goal_ms``."""
    low, high, steps = 0.0, 0.95, []
    for _ in range(settings.bisect_steps):
        if time.time() > deadline:
            break
        ratio = round((low + high) / 2, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = slim_default(work.model, work.example, ratio=ratio)
        model = work.convert(model)
        ms = latency_ms(model, work.timing, settings)
        steps.append({"ratio": ratio, "latency_ms": ms, "params": sp.count_parameters(model)})
        low, high = (ratio, high) if ms > goal_ms else (low, ratio)
        release(settings)
    best = min(steps, key=lambda s: abs(s["latency_ms"] - goal_ms)) if steps else None
    return {"goal_ms": goal_ms, "steps": steps, "best": best}


def run_latency(settings: Settings, results: Results, models: List[str]) -> None:
    rows: List[Dict[str, Any]] = results.section("latency_target", [])
    start = time.time()
    for i, name in enumerate(models):
        deadline = start + settings.budget_s * (i + 1) / len(models) if settings.budget_s else float("inf")
        row: Dict[str, Any] = {"model": name}
        try:
            work = build(name, settings, settings.dtype)
            row["dense_params"] = sp.count_parameters(work.model)
            row["dense_ms"] = latency_ms(work.model, work.timing, settings)
            # the target search gets 60% of this model's share of the budget, the bisection the rest
            share = settings.budget_s / len(models) if settings.budget_s else 1000.0
            row["slim_target"] = latency_target(work, settings, max(0.6 * share, 20.0))
            rows.append(row)
            results.save()
            # the latency the target run reached, measured here; without one, the target itself
            goal_ms = row["slim_target"].get("latency_ms") or row["dense_ms"] * (1 - LATENCY_TARGET)
            row["uniform"] = bisect_uniform(work, goal_ms, settings, deadline)
            best, params = row["uniform"]["best"], row["slim_target"].get("params")
            if best and params:
                row["params_kept_target_over_uniform"] = params / best["params"]
        except Exception as error:  # noqa: BLE001
            row["error"] = first_line(error)
            if row not in rows:
                rows.append(row)
        say({k: v for k, v in row.items() if not isinstance(v, dict)})
        print(f"  slim target: {row.get('slim_target')}\n  uniform: {row.get('uniform', {}).get('best')}", flush=True)
        results.save()
        release(settings)


# ---- plot --------------------------------------------------------------------------------------------------------
def plot(rows: List[Dict[str, Any]], path: str, meta: Dict[str, Any]) -> None:
    """Speedup (and MAC reduction, dashed) against the ratio, and the realised fraction, per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    for name in dict.fromkeys(r["model"] for r in rows if "speedup" in r):
        color = next(colors)
        for library, marker, style in (("structprune", "o", "-"), ("torch-pruning", "s", ":")):
            pts = sorted((r["ratio"], r["speedup"], r["mac_ratio"], r["realised"]) for r in rows
                         if r["model"] == name and r.get("library") == library and "speedup" in r)
            if not pts:
                continue
            ratio, speed, macs, realised = zip(*pts)
            left.plot(ratio, speed, marker=marker, linestyle=style, color=color, label=f"{name} {library}")
            right.plot(ratio, realised, marker=marker, linestyle=style, color=color, label=f"{name} {library}")
            if library == "structprune":
                left.plot(ratio, macs, linestyle="--", color=color, alpha=0.5, label=f"{name} MAC reduction")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set(xlabel="ratio", ylabel="x faster (dashed: x fewer MACs)", yscale="log")
    left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.set(xlabel="ratio", ylabel="speedup / MAC reduction", ylim=(0, 1.2))
    for ax in (left, right):
        ax.legend(fontsize=6)
    fig.suptitle(f"{meta.get('card')}, {meta.get('dtype')}, torch {meta.get('torch')}, {meta.get('date', '')[:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------------------
def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {MODELS}")
    parser.add_argument("--ratios", default=None, help="comma-separated (default: 0.1 .. 0.8)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock seconds per section, split evenly over the models; what does not fit "
                             "is recorded as skipped")
    parser.add_argument("--tp-timeout-s", type=float, default=None,
                        help="give up on one Torch-Pruning call after this long, and on Torch-Pruning for the rest "
                             "of that model (default 60; 20 with --smoke)")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, batch 2, ratio 0.5, on the CPU")
    args = parser.parse_args(argv)
    for value, valid, what in ((args.only, SECTIONS, "--only"), (args.models, MODELS, "--models")):
        bad = [v for v in value.split(",") if v not in valid]
        if bad:
            parser.error(f"{what}: unknown {bad}; choose from {valid}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    settings = Settings.make(args)
    if settings.device.type != "cuda" and not settings.smoke:
        print("No CUDA device: this benchmark measures GPU latency (use --smoke to check the script on a CPU).")
        return 0
    torch.backends.cudnn.benchmark = True
    meta = metadata(settings)
    stem = output_stem(args, meta)
    results = Results(stem + ".json", meta)
    print(f"{meta['card']}  torch {meta['torch']}  -> {stem}.json", flush=True)
    models, sections = args.models.split(","), args.only.split(",")
    if "sweep" in sections:
        run_sweep(settings, results, models, stem)
    if "verify" in sections:
        run_verify(settings, results, models)
    if "latency" in sections:
        run_latency(settings, results, models)
    results.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
