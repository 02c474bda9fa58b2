"""Size and speed of a model: parameters, MACs (FlopCounterMode) and latency (torch.utils.benchmark)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..graph.capture import Inputs, eval_mode
from ..options import require_module


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (a tensor shared by several modules counts once)."""
    return sum(p.numel() for p in require_module(model).parameters())


def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2 as counted by FlopCounterMode), fused attention
    kernels included (:mod:`structprune.tools.flop_formulas`): the count is the same on a CPU, a GPU
    and the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from .flop_formulas import FLOP_FORMULAS

    inputs = Inputs.from_example(example_input)
    with torch.no_grad(), eval_mode(model), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        model(*inputs.args, **inputs.kwargs)
    return counter.get_total_flops() // 2


def latency_ms(model: nn.Module, example_input: Any, min_run_time: float = 0.5) -> float:
    """Median forward latency in milliseconds (torch.utils.benchmark, blocked autorange)."""
    import logging

    # importing torch.utils.benchmark warns about a missing CUDA toolkit on CPU-only machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    inputs = Inputs.from_example(example_input)
    with torch.no_grad(), eval_mode(model):
        timer = benchmark.Timer(stmt="model(*args, **kwargs)",
                                globals={"model": model, "args": inputs.args, "kwargs": inputs.kwargs})
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
