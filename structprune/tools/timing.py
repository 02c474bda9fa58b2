"""Timing one forward pass the way the hardware runs it: CUDA graphs on a GPU, repeats on a noisy machine.

On a GPU an eager forward at a small batch measures Python's kernel launches, not the GPU work, so
CUDA modules are captured into a CUDA graph and the graph's replays are timed (eager timing remains
the fallback when capture fails, e.g. for a forward that syncs with the host). On a CPU the forward
itself is timed, after warm-up runs, with ``time.perf_counter``.

- :func:`time_forward`: the median over ``repeats`` blocks of one model, each at least ``min_time``
  seconds long (an absolute latency to report);
- :func:`paired_ratio`: how two models compare, from alternating blocks (what a decision or a
  speedup claim should rest on: a shared machine drifts by more than the difference being measured).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

WARMUP = 3  # runs before timing: caches, oneDNN primitives and cudnn.benchmark's algorithm search settle


@dataclass
class _Runner:
    """One forward, ready to be timed: a CUDA graph replay (or the eager call) and how to wait for it."""

    run: Callable[[], Any]
    synchronize: Callable[[], None]
    per_block: int = 1

    def block(self) -> float:
        """Seconds per forward over one block of ``per_block`` forwards."""
        self.synchronize()
        start = time.perf_counter()
        for _ in range(self.per_block):
            self.run()
        self.synchronize()
        return (time.perf_counter() - start) / self.per_block


def _runner(module: nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]], cuda_graph: Optional[bool],
            warmup: int, min_time: float) -> _Runner:
    """Capture (on CUDA), warm up and size the blocks of one forward; call under ``torch.no_grad()``."""
    kwargs = dict(kwargs or {})
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    on_cuda = any(t.is_cuda for t in tensors) or any(p.is_cuda for p in module.parameters())
    run: Callable[[], Any] = lambda: module(*args, **kwargs)  # noqa: E731
    if on_cuda and cuda_graph is not False:
        replay = _captured(run)
        if replay is not None:
            run = replay
    for _ in range(warmup):
        run()
    synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
    return _Runner(run, synchronize, _runs_per_block(run, synchronize, min_time))


def time_forward(module: nn.Module, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None, *,
                 repeats: int = 5, min_time: float = 0.05, cuda_graph: Optional[bool] = None,
                 warmup: int = WARMUP) -> float:
    """Median seconds of one ``module(*args, **kwargs)`` under ``torch.no_grad()``.

    ``cuda_graph`` (default: when the inputs are on a CUDA device) times replays of a captured CUDA
    graph. ``repeats`` blocks are timed, each running the forward enough times to last ``min_time``
    seconds; the median block time per forward is returned. ``warmup`` untimed runs come first."""
    with torch.no_grad():
        runner = _runner(module, args, kwargs, cuda_graph, warmup, min_time)
        return statistics.median(runner.block() for _ in range(max(repeats, 1)))


def paired_ratio(candidate: nn.Module, reference: nn.Module, args: Sequence[Any] = (),
                 kwargs: Optional[Dict[str, Any]] = None, *, pairs: int = 5, min_time: float = 0.01,
                 cuda_graph: Optional[bool] = None, precision: Optional[float] = None,
                 max_pairs: int = 40) -> float:
    """Candidate seconds over reference seconds: the ratio of the two models' fastest blocks, the
    blocks of the two timed alternately.

    A shared machine slows a run down by tens of percent at random moments, and never speeds one up
    beyond what the hardware can do; the fastest of many short blocks is what each model costs when
    nothing interferes (``timeit``'s reasoning), and alternating short blocks gives both models the
    same chances to meet a quiet moment. Each model is captured and warmed up once; a block runs the
    forward enough times to last ``min_time`` seconds (one run for a forward longer than that).
    At least ``pairs`` pairs are timed; with ``precision`` (relative, e.g. 0.01) pairs are added, up
    to ``max_pairs``, until the ratio has moved by less than that over the last half of the pairs."""
    with torch.no_grad():
        reference_runner = _runner(reference, args, kwargs, cuda_graph, WARMUP, min_time)
        candidate_runner = _runner(candidate, args, kwargs, cuda_graph, WARMUP, min_time)
        fastest_reference = fastest_candidate = math.inf
        estimates: List[float] = []
        while True:
            fastest_reference = min(fastest_reference, reference_runner.block())
            fastest_candidate = min(fastest_candidate, candidate_runner.block())
            estimates.append(fastest_candidate / fastest_reference)
            if len(estimates) >= max(pairs, 1) and (precision is None or len(estimates) >= max_pairs or
                                                    _settled(estimates, precision)):
                return estimates[-1]


def _settled(estimates: List[float], precision: float) -> bool:
    """Whether the running estimate has stayed within ``precision`` (relative) over the last half of its
    history (at least 3 values): new fastest blocks no longer move it."""
    recent = estimates[len(estimates) // 2:]
    if len(recent) < 3:
        return False
    return max(recent) - min(recent) <= precision * estimates[-1]


def _runs_per_block(run: Callable[[], Any], synchronize: Callable[[], None], min_time: float) -> int:
    synchronize()
    start = time.perf_counter()
    run()
    synchronize()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(min_time / once))


def _captured(run: Callable[[], Any]) -> Optional[Callable[[], Any]]:
    """``run`` captured into a CUDA graph (warmed up on a side stream first, as capture requires), or None
    when the forward cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
    except Exception:  # any capture failure: fall back to eager timing, never fail the measurement
        torch.cuda.synchronize()
        return None
    return graph.replay


__all__ = ["paired_ratio", "time_forward"]
