"""Block influence (ShortGPT, Men et al. 2024): how much a residual block changes the stream it adds to.

For every position (a token, or a pixel of a feature map), the block's input ``x`` and output ``y`` are
vectors over the hidden (channel) dim; the block's influence is ``1 - cos(x, y)`` averaged over every
position of every calibration batch. A block whose output points where its input did adds little, and
is the first to remove. Forward hooks fold each call into a running sum (float64), so memory never
grows with the data: no activation outlives the forward pass that made it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..errors import InvalidOptionError
from ..graph.capture import eval_mode
from ..options import require_module
from ..scoring.activations import run_batch
from .find import block_input, first_tensor


@dataclass
class _Running:
    """Sum of the cosine similarities seen at ``count`` positions."""

    total: float = 0.0
    count: int = 0
    mismatch: Optional[str] = None  # why the block's output cannot be compared with its input

    @property
    def influence(self) -> float:
        return 1.0 - self.total / self.count


def _channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    """Channels are dim 1 of a convolutional block's feature maps, the last dim of a transformer's hidden states."""
    if x.dim() > 2 and any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()):
        return 1
    return -1


def _hook(running: _Running):
    def record(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
        x, y = block_input(args, kwargs), first_tensor(output)
        if x is None or y is None or x.shape != y.shape:
            running.mismatch = (f"its output {None if y is None else tuple(y.shape)} does not have its input's shape "
                                f"{None if x is None else tuple(x.shape)}")
            return
        cos = nn.functional.cosine_similarity(x.detach().double(), y.detach().double(), dim=_channel_dim(module, x))
        running.total += float(cos.sum())
        running.count += cos.numel()
    return record


def measure_influence(model: nn.Module, data: Iterable, blocks: Sequence[str],
                      run: Callable[[nn.Module, Any], Any] = run_batch) -> Dict[str, float]:
    """Influence of each of ``blocks`` (module paths) over the batches of ``data``, each fed to the model by
    ``run(model, batch)``, in the order of ``blocks``."""
    running: Dict[str, _Running] = {}
    handles: List[Any] = []
    try:
        for path in blocks:
            running[path] = _Running()
            handles.append(model.get_submodule(path).register_forward_hook(_hook(running[path]), with_kwargs=True))
        batches = 0
        with eval_mode(model), torch.no_grad():
            for batch in data:
                run(model, batch)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if batches == 0:
        raise InvalidOptionError("the calibration data yielded no batches; pass a non-empty data=...")
    for path, stats in running.items():
        if stats.mismatch is not None:
            raise InvalidOptionError(f"block {path!r} has no influence: {stats.mismatch}; only blocks that keep the "
                                     f"shape of their input can be compared with it (see residual_blocks)")
        if stats.count == 0:
            raise InvalidOptionError(f"block {path!r} never ran on the calibration data: its influence is unknown")
    return {path: stats.influence for path, stats in running.items()}


def _check_paths(model: nn.Module, blocks: Any) -> List[str]:
    if isinstance(blocks, str) or not isinstance(blocks, Iterable):
        raise InvalidOptionError(f"blocks must be a list of module paths, got {blocks!r}; pass e.g. "
                                 f"blocks=['model.layers.3']")
    paths = list(dict.fromkeys(blocks))
    for path in paths:
        if not (isinstance(path, str) and path and _is_submodule(model, path)):
            raise InvalidOptionError(f"blocks holds {path!r}, which is not the path of a submodule of the model; "
                                     f"pass paths from residual_blocks(model, example_input)")
    return paths


def _is_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def block_influence(model: nn.Module, data: Iterable, blocks: Optional[Sequence[str]] = None, *,
                    tracer: str = "auto") -> Dict[str, float]:
    """How much each residual block changes its input: ``1 - cos(input, output)``, averaged over positions.

    Args:
        model: any ``nn.Module``.
        data: calibration batches (a list or a DataLoader): tensors, dicts of keyword inputs, or
            ``(inputs, targets)`` pairs, each fed to the model as :func:`~structprune.scoring.activations.run_batch`
            does. The batches are streamed: hooks keep running sums, never the activations.
        blocks: module paths to measure; by default every candidate of :func:`residual_blocks`,
            found with the first batch as the example input.
        tracer: how candidates are found when ``blocks`` is None (``"auto"``, ``"fx"``, ``"export"``).

    Returns:
        ``{path: influence}`` in the order of ``blocks`` (module order by default). 0 means the block
        leaves every position's direction unchanged; the lowest are the first to remove.
    """
    require_module(model)
    if data is None:
        raise InvalidOptionError("block_influence needs calibration batches: pass data=[batch, ...] (a list with "
                                 "the example input alone will do, less faithfully)")
    if blocks is None:
        from .find import find_blocks  # only here: finding candidates traces the model

        iterator = iter(data)
        first = next(iterator, None)
        if first is None:
            raise InvalidOptionError("the calibration data yielded no batches; pass a non-empty data=...")
        blocks = find_blocks(model, example_of(first), tracer).paths
        # a one-shot iterator (a generator) has lost its first batch: put it back, still streaming
        data = itertools.chain([first], iterator) if iterator is data else data
    paths = _check_paths(model, blocks)
    return measure_influence(model, data, paths) if paths else {}


def example_of(batch: Any) -> Any:
    """The example input a calibration batch stands for (its inputs, as :func:`run_batch` reads them)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    return batch
