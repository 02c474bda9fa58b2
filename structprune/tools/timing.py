"""Timing one forward pass the way the hardware runs it: medians of repeats, CUDA graphs on a GPU.

On a GPU an eager forward at a small batch measures Python's kernel launches, not the GPU work, so
CUDA modules are captured into a CUDA graph and the graph's replays are timed with CUDA events
(eager timing remains the fallback when capture fails, e.g. for a forward that syncs with the host).
On a CPU the forward itself is timed, after warm-up runs, with ``time.perf_counter``. Both return
the median over ``repeats`` blocks, each at least ``min_time`` seconds long, which is what makes two
timings taken side by side comparable on a noisy machine.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

WARMUP = 3  # runs before timing: caches, oneDNN primitives and cudnn.benchmark's algorithm search settle


def time_forward(module: nn.Module, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None, *,
                 repeats: int = 5, min_time: float = 0.05, cuda_graph: Optional[bool] = None,
                 warmup: int = WARMUP) -> float:
    """Median seconds of one ``module(*args, **kwargs)`` under ``torch.no_grad()``.

    ``cuda_graph`` (default: when the inputs are on a CUDA device) times replays of a captured CUDA
    graph. ``repeats`` blocks are timed, each running the forward enough times to last ``min_time``
    seconds; the median block time per forward is returned. ``warmup`` untimed runs come first."""
    kwargs = dict(kwargs or {})
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    on_cuda = any(t.is_cuda for t in tensors) or any(p.is_cuda for p in module.parameters())
    with torch.no_grad():
        run: Callable[[], Any] = lambda: module(*args, **kwargs)  # noqa: E731
        if on_cuda and cuda_graph is not False:
            replay = _captured(run)
            if replay is not None:
                run = replay
        for _ in range(warmup):
            run()
        synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
        per_block = _runs_per_block(run, synchronize, min_time)
        samples = []
        for _ in range(max(repeats, 1)):
            synchronize()
            start = time.perf_counter()
            for _ in range(per_block):
                run()
            synchronize()
            samples.append((time.perf_counter() - start) / per_block)
    return statistics.median(samples)


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


def paired_ratio(candidate: nn.Module, reference: nn.Module, args: Sequence[Any] = (),
                 kwargs: Optional[Dict[str, Any]] = None, *, pairs: int = 5, min_time: float = 0.05) -> float:
    """Median over ``pairs`` of (candidate seconds / reference seconds), the two timed back to back.

    A shared machine drifts by tens of percent within a minute; timings taken moments apart drift
    together, so their ratio is what can be compared (and what a benchmark should report)."""
    ratios = []
    for k in range(max(pairs, 1)):
        warmup = WARMUP if k == 0 else 1
        reference_time = time_forward(reference, args, kwargs, repeats=1, min_time=min_time, warmup=warmup)
        candidate_time = time_forward(candidate, args, kwargs, repeats=1, min_time=min_time, warmup=warmup)
        ratios.append(candidate_time / reference_time)
    return statistics.median(ratios)


__all__ = ["paired_ratio", "time_forward"]
