#!/usr/bin/env python3
"""Regenerate ``tests/data/timm_families.json``: one small model per timm model family.

A family is the timm module that registers a model (``timm.list_modules()``; ``resnet``,
``vision_transformer``, ...). For every family the script

1. counts the parameters of each of its models cheaply, built on the meta device
   (``with torch.device("meta"): timm.create_model(name)``; models that fail to build are skipped),
   and keeps the smallest one (ties broken by name);
2. finds the smallest square input side that model runs on, trying real forwards from 64 pixels up
   to its ``pretrained_cfg['input_size']``; a model that only runs at a fixed resolution (ViT-style
   patch embeddings with a fixed position table) is rebuilt with ``img_size=side`` when that makes
   it accept a smaller side, and the JSON records that keyword;
3. (unless ``--no-time``) runs exactly what ``tests/test_timm_families.py`` runs, in a fresh
   subprocess per family with one thread and strict rules: seeded build, ``eval()``,
   ``structprune.slim_with_report(model, x, 0.5)`` with verification, and records the CPU time,
   the fraction of parameters removed and, if it failed, the exception (``"status": "fails"``).

The test reads the JSON only; it never calls ``timm.list_models()``. Regenerate after a timm
upgrade (``_timm_version`` says which timm the list was made with)::

    OMP_NUM_THREADS=1 python benchmarks/timm_families.py
    OMP_NUM_THREADS=1 python benchmarks/timm_families.py --families resnet,vgg   # refresh entries
    OMP_NUM_THREADS=1 python benchmarks/timm_families.py --no-time               # list and sides only

Counting parameters on the meta device for all ~1400 timm models takes ~12 minutes on one core;
``--param-cache FILE`` keeps those counts (model -> parameters) between runs.
Hand-made choices (``OVERRIDES`` below: constructor keywords that shrink a model that would not fit
the CI time budget otherwise) are applied on top and recorded in the entry's ``kwargs``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "data" / "timm_families.json"
MIN_SIDE = 64  # as tests/test_zoo.py: smaller inputs collapse most feature maps to 1x1
SIDES = (64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 288, 299, 320, 331, 384, 448, 512)
SLOW_SECONDS = 5.0  # a family whose build + prune + verify takes longer is marked slow in the test
WORKER_TIMEOUT = 600

# family -> constructor keywords for the chosen model, applied before the input side is searched.
# Used only where a family's smallest model alone would take a large share of the CI time budget; the
# keywords keep every kind of block the family has and only take fewer (or narrower) ones.
OVERRIDES: Dict[str, Dict[str, Any]] = {
    "beit": {"depth": 4},  # beit_base_patch16_224: 12 blocks of 768
    "deepseek_vit": {"depth": 4},  # deepseek_vit_412m: 32 blocks of 1024
    "gemma4_vit": {"depth": 4},  # gemma4_vit_167m: 16 blocks of 768
    "naflexvit": {"depth": 4},  # naflexvit_base_patch16_parfac_gap: 12 blocks of 768
    "nasnet": {"num_features": 1056, "stem_size": 32},  # nasnetalarge at NASNet-A mobile widths (same cells)
    "qwen3_vit": {"depth": 4},  # qwen3_vit_88m: 12 blocks of 768
    "vision_transformer_sam": {"depth": 4, "global_attn_indexes": [1, 3]},  # windowed and global blocks both
}


def _quiet() -> None:
    warnings.filterwarnings("ignore")


def meta_parameters(name: str) -> Optional[int]:
    """Parameter count of ``name`` built on the meta device (no memory, no init); None if it fails."""
    import timm
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def smallest_per_family(cache_path: Optional[Path], families: Optional[List[str]]) -> Dict[str, Tuple[str, int]]:
    """family -> (smallest model, its parameter count)."""
    import timm
    cache: Dict[str, Optional[int]] = {}
    if cache_path is not None and cache_path.exists():
        cache = json.loads(cache_path.read_text())
    chosen: Dict[str, Tuple[str, int]] = {}
    for family in timm.list_modules():
        if families and family not in families:
            continue
        sizes = []
        for name in timm.list_models(module=family):
            if name not in cache:
                cache[name] = meta_parameters(name)
            if cache[name] is not None:
                sizes.append((cache[name], name))
        if sizes:
            params, name = min(sizes)
            chosen[family] = (name, params)
        else:
            print(f"{family}: no model builds on the meta device, skipped", file=sys.stderr)
    if cache_path is not None:
        cache_path.write_text(json.dumps(cache, indent=0, sort_keys=True))
    return chosen


def _runs(model: torch.nn.Module, chans: int, side: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.randn(1, chans, side, side))
        return True
    except Exception:
        return False


def _build(name: str, kwargs: Dict[str, Any]) -> torch.nn.Module:
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def find_input(name: str, kwargs: Dict[str, Any]) -> Tuple[List[int], Dict[str, Any]]:
    """Smallest square input ``[C, H, W]`` the model runs on, and the constructor keywords that need."""
    model = _build(name, kwargs)
    chans, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    default = max(height, width)
    candidates = [s for s in SIDES if s < default] + [default]
    found = next((s for s in candidates if _runs(model, chans, s)), None)
    if found is not None and found == MIN_SIDE:
        return [chans, found, found], dict(kwargs)
    # a fixed-resolution model: a smaller img_size at construction often makes it accept a smaller side
    for side in [s for s in candidates if found is None or s < found]:
        try:
            resized = _build(name, {**kwargs, "img_size": side})
        except TypeError as error:
            if "img_size" in str(error):
                break  # the constructor takes no img_size: keep what works
            continue
        except Exception:
            continue  # cannot build at this size (window or patch arithmetic): try a larger one
        if _runs(resized, chans, side):
            return [chans, side, side], {**kwargs, "img_size": side}
    if found is None:  # nothing square ran: the exact pretrained size
        return [chans, height, width], dict(kwargs)
    return [chans, found, found], dict(kwargs)


def run_case(name: str, input_size: List[int], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """What the test does for one entry, timed; never raises."""
    import timm  # noqa: F401 - imported before the clock starts: the test file imports it once

    import structprune as sp
    start, cpu_start = time.perf_counter(), time.process_time()
    result: Dict[str, Any] = {}
    try:
        model = _build(name, kwargs)
        torch.manual_seed(0)
        x = torch.randn(1, *input_size)
        with torch.no_grad():
            expected = model(x)
        small, report = sp.slim_with_report(model, x, 0.5)
        with torch.no_grad():
            got = small(x)
        assert report.verification is not None and report.verification.passed, str(report.verification)
        assert got.shape == expected.shape, (tuple(got.shape), tuple(expected.shape))
        result.update(status="passes", params=report.params_before, removed=round(1 - report.params_after / report.params_before, 4),
                      exact=bool(report.verification.exact), unknown_ops=report.unknown_ops,
                      notes=list(report.graph.notes)[:5])
    except BaseException as error:  # noqa: BLE001 - a family's failure is data here
        message = str(error).strip().splitlines()
        result.update(status="fails", error=type(error).__name__, message="\n".join(message[:4])[:600],
                      where=_where(error))
    # CPU time of this one-thread process: what the case costs, however busy the machine is
    result["seconds"] = round(time.process_time() - cpu_start, 1)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    return result


def _where(error: BaseException) -> str:
    """The innermost frames inside structprune and inside timm, as ``file:line function``."""
    frames = traceback.extract_tb(error.__traceback__)
    picks = []
    for package in ("structprune", "timm"):
        inside = [f for f in frames if f"/{package}/" in f.filename]
        if inside:
            f = inside[-1]
            picks.append(f"{f.filename.split(f'/{package}/')[-1]}:{f.lineno} {f.name}")
    return "; ".join(picks)


def time_in_subprocess(name: str, input_size: List[int], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    from structprune.ops.registry import STRICT_ENV
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{STRICT_ENV: "1"})
    spec = json.dumps({"name": name, "input_size": input_size, "kwargs": kwargs})
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", spec], env=env, capture_output=True,
                              text=True, timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"status": "fails", "error": "Timeout", "message": f"over {WORKER_TIMEOUT} s", "seconds": WORKER_TIMEOUT}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-4:]
        return {"status": "fails", "error": f"crash (exit {done.returncode})", "message": "\n".join(tail)[:600]}
    return json.loads(lines[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--families", help="comma-separated families to (re)generate; the others are kept")
    parser.add_argument("--param-cache", type=Path, help="JSON of model -> meta parameter count, reused and updated")
    parser.add_argument("--no-time", action="store_true", help="skip the timed prune runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _quiet()
    if args.worker:
        spec = json.loads(args.worker)
        torch.set_num_threads(1)
        print(json.dumps(run_case(spec["name"], spec["input_size"], spec["kwargs"])))
        return 0

    import timm
    families = args.families.split(",") if args.families else None
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries: Dict[str, Any] = dict(old.get("families", {})) if families else {}
    for family, (name, params) in smallest_per_family(args.param_cache, families).items():
        kwargs = dict(OVERRIDES.get(family, {}))
        t0 = time.perf_counter()
        input_size, kwargs = find_input(name, kwargs)
        entry: Dict[str, Any] = {"model": name, "input_size": input_size, "kwargs": kwargs,
                                 "variant_params": params}
        line = f"{family:28s} {name:45s} {params / 1e6:7.2f}M {input_size} {kwargs or ''} (search {time.perf_counter() - t0:.0f}s)"
        if not args.no_time:
            timed = time_in_subprocess(name, input_size, kwargs)
            entry.update(timed)
            entry["comment"] = f"build + prune + verify: {timed.get('seconds', '?')} s CPU (one thread)"
            line += f"  {timed['status']} {timed.get('seconds', '?')}s removed={timed.get('removed')} {timed.get('error', '')}"
        entries[family] = entry
        print(line, flush=True)
    timed_total = sum(e.get("seconds", 0) for e in entries.values())
    document = {
        "_comment": ("One smallest model per timm family (timm module), made by benchmarks/timm_families.py; "
                     "read by tests/test_timm_families.py. 'seconds' (and 'comment') is the measured CPU time of "
                     "build + slim_with_report(ratio=0.5) + verification on one thread (its wall time on an idle "
                     "core; 'wall_seconds' is the wall time on the machine that made the list); entries over "
                     f"{SLOW_SECONDS:g} s are marked slow. 'status': 'fails' marks a known failure (xfail, temporary)."),
        "_timm_version": timm.__version__,
        "_torch_version": torch.__version__.split("+")[0],
        "_total_seconds": round(timed_total, 1),
        "_slow_seconds": SLOW_SECONDS,
        "families": dict(sorted(entries.items())),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"{len(entries)} families, {timed_total:.0f} s total -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
