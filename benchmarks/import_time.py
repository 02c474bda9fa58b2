#!/usr/bin/env python3
"""Start-up time: ``import structprune`` and ``structprune --help``, each in a fresh interpreter.

Every repeat starts a new Python process, so nothing is cached in the interpreter; the operating
system's file cache is warmed by one untimed run of each command first. The script prints the median,
minimum and maximum of ``--repeats`` runs, ``import torch`` alone for scale (``import structprune``
and ``structprune --help`` load no torch: names are imported on first use, and the parser imports
nothing heavy), and which optional libraries ``import structprune`` loaded (none should be).

Examples::

    python benchmarks/import_time.py
    python benchmarks/import_time.py --repeats 9 --json benchmarks/results/import_time.json

Set ``OMP_NUM_THREADS=1`` on a shared machine; the numbers are wall times and depend on its load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Dict, List

OPTIONAL = ("torchvision", "transformers", "timm", "matplotlib", "networkx", "scipy", "pandas", "PIL")

COMMANDS: Dict[str, List[str]] = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import structprune": [sys.executable, "-c", "import structprune"],
    "structprune --help": [sys.executable, "-m", "structprune", "--help"],
}


def wall_time(command: List[str]) -> float:
    """Seconds one run of ``command`` takes, from process start to exit; fails loudly if it fails."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(command: List[str], repeats: int) -> Dict[str, float]:
    """Median, minimum and maximum of ``repeats`` timed runs, after one untimed run that warms the file cache."""
    wall_time(command)
    times = [wall_time(command) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def optional_modules_loaded() -> List[str]:
    """The optional libraries in ``sys.modules`` after ``import structprune`` in a fresh interpreter."""
    probe = f"import sys, structprune; print(','.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return [name for name in out.strip().split(",") if name]


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    results: Dict[str, object] = {name: measure(command, args.repeats) for name, command in COMMANDS.items()}
    results["optional_modules_loaded"] = optional_modules_loaded()
    results["repeats"] = args.repeats
    for name in COMMANDS:
        r = results[name]
        assert isinstance(r, dict)
        print(f"{name:<22} median {r['median_s']:6.2f} s   (min {r['min_s']:.2f}, max {r['max_s']:.2f})")
    print(f"optional libraries loaded by 'import structprune': {results['optional_modules_loaded'] or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
