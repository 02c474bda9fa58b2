"""Remove whole residual blocks from a deep copy of a model.

The chosen blocks are never copied: the copy (:func:`~structprune.surgery.copying.deep_copy_module`, whose
memo is seeded with a placeholder for each) skips them, and the stacks that held them are renumbered
(``layers.0 .. layers.k``: ``state_dict`` keys stay contiguous). For a Hugging Face model, whose config
the copy owns, the config follows: ``num_hidden_layers``, every per-layer list (``layer_types``), the
"first k layers" counts (Qwen2's ``max_window_layers``), and the ``layer_idx`` by which each attention
module finds its slot of the KV cache.

There is no exact numerical reference for a model with fewer blocks (unlike channel pruning, nothing in
the original computes what the pruned model computes), so verification checks that the pruned model runs
on the example input and returns outputs of the original's shapes.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InvalidOptionError, StructPruneError, VerificationError
from ..graph.capture import Inputs, eval_mode, output_tensors
from ..options import check_flag, check_fraction, check_integer, require_prunable
from ..surgery.copying import deep_copy_module
from ..tools.metrics import count_parameters
from .find import Candidates, Entry, find_blocks
from .rank import measure_influence

# config lists that are not per layer even when their length happens to equal the number of layers
_NOT_PER_LAYER = ("architectures", "id2label", "label2id", "task_specific_params")
# config counts meaning "the first k layers" (Qwen2: the first max_window_layers use full attention)
_FIRST_K_LAYERS = ("max_window_layers", "first_k_dense_replace")
# attributes of the module owning a stack that some models copy num_hidden_layers into
_DEPTH_ATTRIBUTES = ("num_layers", "num_hidden_layers", "n_layers", "n_layer", "depth")


@dataclass
class DepthReport:
    """What :func:`remove_blocks` did: which blocks went (with their influence), sizes, and notes."""

    removed: Dict[str, float]  # path in the original model -> influence, lowest first
    scores: Dict[str, float]  # influence of every candidate block, in module order
    params_before: int
    params_after: int
    stacks: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # stack that lost blocks -> (before, after)
    calibrated: bool = False  # influence measured on calibration data (False: on the example input alone)
    verified: bool = False  # the pruned model ran on the example input with the original's output shapes
    notes: List[str] = field(default_factory=list)

    @property
    def candidates(self) -> List[str]:
        """Every block that could have been removed, in module order."""
        return list(self.scores)

    def __str__(self) -> str:
        removed = 1 - self.params_after / max(self.params_before, 1)
        lines = [f"removed {len(self.removed)} of {len(self.scores)} residual blocks; parameters "
                 f"{self.params_before:,} -> {self.params_after:,} ({removed:.1%} removed)"]
        width = max((len(path) for path in self.removed), default=0)
        lines.extend(f"  {path:<{width}}  influence {score:.4f}" for path, score in self.removed.items())
        lines.extend(f"stack {stack}: {before} -> {after} entries, renumbered"
                     for stack, (before, after) in self.stacks.items())
        lines.append("influence (1 - cos(input, output)) measured on "
                     + ("the calibration data" if self.calibrated else "the example input alone"))
        lines.extend(self.notes)
        if self.verified:
            lines.append("verified: the pruned model runs on the example input with the original's output shapes "
                         "(depth pruning has no exact numerical reference)")
        return "\n".join(lines)


def _check_request(n: Any, fraction: Any, blocks: Any) -> Tuple[Optional[int], Optional[float]]:
    """Exactly one of ``n``, ``fraction`` and ``blocks``, checked: (n, fraction)."""
    given = [name for name, value in (("n", n), ("fraction", fraction), ("blocks", blocks)) if value is not None]
    if len(given) != 1:
        raise InvalidOptionError(f"pass exactly one of n= (a number of blocks), fraction= (of the candidate blocks) "
                                 f"or blocks= (paths); got {', '.join(given) if given else 'none'}")
    if n is not None:
        return check_integer("n", n, low=0, example="n=2"), None
    if fraction is not None:
        return None, check_fraction("fraction", fraction, closed=True, example="fraction=0.25")
    if isinstance(blocks, str) or not isinstance(blocks, Sequence):
        raise InvalidOptionError(f"blocks must be a list of module paths, got {blocks!r}; pass e.g. "
                                 f"blocks=['model.layers.3']")
    return None, None


def _no_candidates_error(request: str) -> InvalidOptionError:
    return InvalidOptionError(
        f"{request}, but the model has no removable residual blocks: a candidate is an entry of an nn.ModuleList or "
        f"nn.Sequential that returns its input's shape and adds its input back (x + f(x)). Without that shortcut, "
        f"removing a block breaks what follows it")


def _by_influence(found: Candidates, scores: Dict[str, float], count: int) -> List[Entry]:
    """The ``count`` least influential blocks, never the last entry of a stack."""
    if count and not found.blocks:
        raise _no_candidates_error(f"asked to remove {count} block(s)")
    left = dict(found.stacks)
    order = {block.path: i for i, block in enumerate(found.blocks)}
    chosen: List[Entry] = []
    for block in sorted(found.blocks, key=lambda b: (scores[b.path], order[b.path])):
        if len(chosen) == count:
            break
        if left[block.stack] > 1:
            chosen.append(block)
            left[block.stack] -= 1
    if len(chosen) < count:
        raise InvalidOptionError(f"asked to remove {count} of {len(found.blocks)} residual blocks, but at most "
                                 f"{len(chosen)} can go: every stack keeps at least one entry; pass n<={len(chosen)}")
    return chosen


def _named(found: Candidates, blocks: Sequence[str]) -> List[Entry]:
    """The entries ``blocks`` names, checked: candidates only, and no stack emptied."""
    by_path = {block.path: block for block in found.blocks}
    unknown = [path for path in blocks if not isinstance(path, str) or path not in by_path]
    if unknown:
        listing = ", ".join(found.paths) if found.paths else "none: the model has no removable residual blocks"
        raise InvalidOptionError(f"blocks names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not residual "
                                 f"block(s) of the model; the candidates are: {listing}")
    chosen = [by_path[path] for path in dict.fromkeys(blocks)]
    for stack, size in found.stacks.items():
        if sum(block.stack == stack for block in chosen) >= size:
            raise InvalidOptionError(f"blocks would remove every entry of {stack!r}; keep at least one")
    return chosen


def _layer_config(model: nn.Module, layers: int) -> Optional[Any]:
    """The config describing a stack of ``layers`` layers: the model's (Hugging Face) config, or a sub-config of it
    (a multimodal model's ``text_config``); None if none says it has that many layers."""
    config = getattr(model, "config", None)
    if config is None or isinstance(config, nn.Module) or not hasattr(config, "__dict__"):
        return None
    subconfigs = [value for value in vars(config).values() if hasattr(value, "to_dict") and hasattr(value, "__dict__")]
    return next((c for c in [config, *subconfigs] if _num_layers(c) == layers), None)


def _num_layers(config: Any) -> Optional[int]:
    try:
        value = getattr(config, "num_hidden_layers", None)
    except Exception:  # a heterogeneous config refuses some global reads
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _update_config(config: Any, kept: List[int], before: int, notes: List[str]) -> None:
    """Make ``config`` describe the layers ``kept`` (their old positions) of the ``before`` it described."""
    if getattr(config, "is_heterogeneous", False):
        raise StructPruneError("the model's config sets per-layer overrides (per_layer_config), which depth pruning "
                               "does not renumber yet; remove blocks from a model with a homogeneous config")
    config.num_hidden_layers = len(kept)
    notes.append(f"config.num_hidden_layers: {before} -> {len(kept)}")
    for key, value in list(vars(config).items()):
        if key.startswith("_") or key in _NOT_PER_LAYER or key.endswith(("token_id", "token_ids")):
            continue
        if isinstance(value, (list, tuple)) and len(value) == before:
            setattr(config, key, type(value)(value[i] for i in kept))
            notes.append(f"config.{key} sliced to the kept layers")
        elif key in _FIRST_K_LAYERS and isinstance(value, int) and not isinstance(value, bool):
            count = sum(i < value for i in kept)
            if count != value:
                setattr(config, key, count)
                notes.append(f"config.{key}: {value} -> {count} (the kept layers among its first {value})")


def _renumber(stack: nn.Module, gone: set) -> Dict[int, int]:
    """Drop the ``gone`` keys of ``stack`` and renumber a numbered one; return old index -> new index."""
    items = list(stack._modules.items())
    numbered = all(key.isdigit() for key, _ in items)
    kept = [(key, child) for key, child in items if key not in gone]
    stack._modules.clear()
    moved = {}
    for i, (key, child) in enumerate(kept):
        stack._modules[str(i) if numbered else key] = child
        if numbered:
            moved[int(key)] = i
    return moved


def _renumber_layer_indices(stack: nn.Module, moved: Dict[int, int], path: str, notes: List[str]) -> None:
    """Point every ``layer_idx`` (an attention module's slot in the KV cache) at its layer's new position."""
    stale = set()
    for module in stack.modules():
        index = module.__dict__.get("layer_idx")
        if not isinstance(index, int) or isinstance(index, bool):
            continue
        if index in moved:
            setattr(module, "layer_idx", moved[index])
        else:
            stale.add(index)
    if stale:
        notes.append(f"{path}: layer_idx {sorted(stale)} refer to removed layers (shared KV caches?) and were left "
                     f"as they are")


def without_blocks(model: nn.Module, chosen: List[Entry], notes: List[str]
                   ) -> Tuple[nn.Module, Dict[str, Tuple[int, int]]]:
    """A deep copy of ``model`` (its config included) without the ``chosen`` entries; also stack -> (before, after)."""
    # seeded memo: each removed block "is already copied" as a placeholder, so its tensors are never cloned
    memo: Dict[int, Any] = {id(model.get_submodule(e.path)): nn.Identity() for e in chosen}
    twin = deep_copy_module(model, memo)
    # every stack and its owner, found before any is renumbered: renumbering an outer stack moves the inner ones
    paths = list(dict.fromkeys(e.stack for e in chosen))
    stacks = [(path, twin.get_submodule(path), twin.get_submodule(path.rpartition(".")[0])) for path in paths]
    sizes = {}
    for stack_path, stack, owner in stacks:
        before = len(stack._modules)
        moved = _renumber(stack, {e.key for e in chosen if e.stack == stack_path})
        after = len(stack._modules)
        sizes[stack_path] = (before, after)
        _renumber_layer_indices(stack, moved, stack_path, notes)
        config = _layer_config(twin, before) if moved else None
        if config is not None:
            _update_config(config, sorted(moved), before, notes)
        for name in _DEPTH_ATTRIBUTES:
            value = owner.__dict__.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value == before:
                setattr(owner, name, after)
                notes.append(f"{stack_path.rpartition('.')[0] or 'model'}.{name}: {before} -> {after}")
    return twin, sizes


def _verify(pruned: nn.Module, inputs: Inputs, expected: List[Tuple[int, ...]], notes: List[str]) -> None:
    """The pruned model runs on the example input and returns the original's output shapes; a Hugging Face model
    rebuilt from its config (as ``from_pretrained`` would) has its parameters' shapes."""
    fresh = inputs.cloned()
    with eval_mode(pruned), torch.no_grad():
        try:
            shapes = [tuple(t.shape) for t in output_tensors(pruned(*fresh.args, **fresh.kwargs))]
        except Exception as error:
            raise VerificationError(f"the model without the removed blocks fails on the example input: "
                                    f"{type(error).__name__}: {error}") from error
    if shapes != expected:
        raise VerificationError(f"the model without the removed blocks returns shapes {shapes}, the original "
                                f"{expected}")
    config = getattr(pruned, "config", None)
    if config is None or not callable(getattr(pruned, "save_pretrained", None)):
        return
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rebuilt = type(pruned)(copy.deepcopy(config))
        wanted = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    except Exception as error:  # a class that cannot be built from its config alone: nothing to compare
        notes.append(f"the pruned model could not be rebuilt from its config to check it ({type(error).__name__})")
        return
    if wanted != got:
        differ = sorted(set(wanted) ^ set(got) | {k for k in set(wanted) & set(got) if wanted[k] != got[k]})
        notes.append(f"warning: the config does not describe the pruned model, from_pretrained would not load it: "
                     f"{len(differ)} tensor(s) differ, e.g. {differ[:3]}")


def _call(model: nn.Module, inputs: Inputs) -> Any:
    fresh = inputs.cloned()
    return model(*fresh.args, **fresh.kwargs)


def remove_blocks(model: nn.Module, example_input: Any, n: Optional[int] = None, fraction: Optional[float] = None,
                  blocks: Optional[Sequence[str]] = None, data: Optional[Any] = None, verify: bool = True, *,
                  tracer: str = "auto") -> Tuple[nn.Module, DepthReport]:
    """Return a copy of ``model`` without whole residual blocks (depth pruning), and a :class:`DepthReport`.

    The least influential blocks go first (ShortGPT's block influence: 1 - cosine similarity between
    a block's input and output, see :func:`block_influence`). ``model`` and its config are never
    changed.

    Args:
        model: any ``nn.Module``; candidates are found by :func:`residual_blocks`.
        example_input: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        n: remove this many blocks.
        fraction: remove this fraction of the candidate blocks (rounded to the nearest count).
        blocks: remove exactly these candidate paths instead of ranking.
        data: calibration batches for the ranking (tensors, dicts of inputs, or ``(inputs, targets)``
            pairs). Without them the example input alone ranks the blocks, with a warning.
        verify: run the pruned model on the example input and raise
            :class:`~structprune.errors.VerificationError` unless its outputs have the original's
            shapes. Depth pruning has no exact numerical reference, so values are not compared.
        tracer: how the model is captured to find residual connections.

    Every stack keeps at least one entry; asking for more raises
    :class:`~structprune.errors.InvalidOptionError`, as does a path in ``blocks`` that is not a
    candidate (the message lists them).

    Returns:
        The pruned model (stacks renumbered; a Hugging Face model's ``num_hidden_layers``,
        per-layer config lists and ``layer_idx`` follow) and the report.
    """
    require_prunable(model)
    check_flag("verify", verify)
    n, fraction = _check_request(n, fraction, blocks)
    inputs = Inputs.from_example(example_input)
    found = find_blocks(model, example_input, tracer)
    # a fraction of the candidates, rounded half up (0.2 of 5 blocks is 1, 0.5 of 5 is 3)
    count = n if fraction is None else math.floor(fraction * len(found.blocks) + 0.5)
    chosen = _named(found, blocks) if blocks is not None else []
    if count and data is None and found.blocks:
        warnings.warn("ranking residual blocks by their influence on the example input alone; calibration data "
                      "(data=[batch, ...], representative inputs) gives a more faithful ranking", UserWarning,
                      stacklevel=2)
    scores: Dict[str, float] = {}
    if found.blocks and data is not None:
        scores = measure_influence(model, data, found.paths)
    elif found.blocks:  # the example input, read as the model's arguments (run_batch would take a pair for a batch)
        scores = measure_influence(model, [inputs], found.paths, _call)
    if count is not None:
        chosen = _by_influence(found, scores, count)
    notes = list(found.notes)
    pruned, stacks = without_blocks(model, chosen, notes)
    removed = {e.path: scores[e.path] for e in sorted(chosen, key=lambda e: scores[e.path])}
    if verify:
        _verify(pruned, inputs, found.outputs, notes)
    report = DepthReport(removed, scores, count_parameters(model), count_parameters(pruned), stacks,
                         calibrated=data is not None, verified=verify, notes=notes)
    return pruned, report
