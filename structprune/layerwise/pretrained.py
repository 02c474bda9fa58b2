"""``prune_pretrained``: prune a Hugging Face checkpoint folder into another, one decoder layer at a time.

    plan on meta  ->  calibrate layer by layer  ->  score tensor by tensor  ->  plan (same planner as slim)
    ->  prune and verify layer by layer, writing shard by shard  ->  check the folder  ->  move it into place

Memory holds one decoder layer, the modules outside the layers while they run, and the calibration
hidden states (spilled to disk past ``activation_memory``), whatever the depth of the model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch

from ..errors import InvalidOptionError, LoadError, StructPruneError, VerificationError
from ..options import Options
from ..planning.planner import Plan
from ..scoring.activations import InputStatistics, watch_inputs, weighted_layers
from ..tools.progress import progress_bar
from ..verify import VerificationResult, is_exact
from .checkpoint import Checkpoint
from .layer_loop import HiddenStates, LayerLoop
from .session import StreamedSession
from .skeleton import Materializer, build_skeleton, checkpoint_dtype, load_config
from .surgery import LayerSurgery, hidden_keep, zeroed_reference
from .verify_blocks import check_block
from .writer import DEFAULT_SHARD_BYTES, ShardWriter

logger = logging.getLogger("structprune")

# slim options that have no meaning here: the model is never in memory, nor is a loss computed over it
_NOT_HERE = ("inplace", "loss_fn", "reference_widths", "tracer")
LLM_DEFAULTS = {"criterion": "flap", "hidden": False}


@dataclass
class PretrainedReport:
    """What :func:`prune_pretrained` did.

    Attributes:
        destination: the folder written.
        plan: the plan applied.
        params_before, params_after: parameter counts (tied tensors once).
        blocks: the verdict for every block (empty with ``verify=False``).
        notes: what the engine had to say (config fields, kept groups).
        seconds: wall time per stage.
        bytes_read, bytes_written: checkpoint bytes read and written.
    """

    destination: Path
    plan: Plan
    params_before: int
    params_after: int
    blocks: List[VerificationResult] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0

    def __str__(self) -> str:
        removed = 1 - self.params_after / max(self.params_before, 1)
        lines = [f"wrote {self.destination}: parameters {self.params_before:,} -> {self.params_after:,} "
                 f"({removed:.1%} removed)"]
        if self.blocks:
            exact = [b for b in self.blocks if b.exact]
            worst = max((b.max_relative_error for b in exact), default=0.0)
            lines.append(f"verified {len(self.blocks)} blocks one at a time ({len(exact)} exactly, largest relative "
                         f"error {worst:.2g})")
        lines.extend(self.notes)
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _meta_example(batch: Any) -> Any:
    """The first calibration batch as the graph's example input, on ``meta``."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
    as_meta = torch.utils._pytree.tree_map(
        lambda v: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v, inputs)
    return as_meta if isinstance(as_meta, dict) else (as_meta,)


def _calibrate(loop: LayerLoop, materializer: Materializer, skeleton: torch.nn.Module,
               progress: bool) -> Dict[str, InputStatistics]:
    """Statistics of every weighted layer's inputs, one block at a time, then the head."""
    layers = weighted_layers(skeleton)
    statistics: Dict[str, InputStatistics] = {}
    states = loop.capture()
    bar = progress_bar(len(loop.blocks), "calibrating layers") if progress else None
    for index, prefix in enumerate(loop.block_prefixes):
        handles = watch_inputs([entry for entry in layers if entry[0].startswith(f"{prefix}.")], statistics)
        try:
            with materializer.loaded(materializer.names_under(prefix)):
                states = loop.run_block(index, states)
        finally:
            for handle in handles:
                handle.remove()
        logger.info("calibrated block %d of %d", index + 1, len(loop.blocks))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    inside = tuple(f"{p}." for p in loop.block_prefixes)
    handles = watch_inputs([entry for entry in layers if not entry[0].startswith(inside)], statistics)
    try:
        loop.replay_head(states)
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats for name, stats in statistics.items() if stats.count}


def _prune_blocks(loop: LayerLoop, surgery: LayerSurgery, writer: ShardWriter, first: HiddenStates,
                  verify: bool, exact: bool, progress: bool) -> List[VerificationResult]:
    """Prune every block (and verify it on the first batch's hidden states), writing its tensors."""
    materializer, verdicts, states = surgery.materializer, [], first
    keep = hidden_keep(surgery)
    bar = progress_bar(len(loop.blocks), "pruning layers") if progress else None
    for index, prefix in enumerate(loop.block_prefixes):
        block = loop.blocks[index]
        with materializer.loaded(materializer.names_under(prefix)):
            keys = surgery.keys_under(prefix)
            values, twin = surgery.pruned_tensors(keys)
            for key in keys:
                writer.add(materializer.keys.saved(key), values[key])
            surgery.mark_written(keys)
            if verify:
                hidden = states[0]
                states = loop.run_block(index, states, only=0)  # the dense output: the next block's input
                pruned_block = twin.get_submodule(prefix)
                with zeroed_reference(block, prefix, surgery) as reference:
                    verdict = check_block(index, reference, pruned_block, loop.calls[0], hidden, keep, exact)
                verdicts.append(verdict)
                if not verdict.passed:
                    raise VerificationError(f"{verdict}: a rule pruned this layer inconsistently; nothing was "
                                            f"written. Please report it with the model's config")
            del values, twin
        logger.info("pruned block %d of %d", index + 1, len(loop.blocks))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return verdicts


def _prune_outside(loop: LayerLoop, surgery: LayerSurgery, writer: ShardWriter) -> None:
    """The tensors outside the blocks, one at a time; those the plan leaves alone are copied as stored."""
    materializer = surgery.materializer
    for name, keys in surgery.outside_units(loop.block_prefixes):
        if name not in surgery.changed and not any(k in surgery.new_keys for k in keys):
            stored = materializer.stored[name]
            value = materializer.checkpoint.read([stored])[stored]
            for key in keys:
                writer.add(materializer.keys.saved(key), value)
        else:
            with materializer.loaded([name]):
                values, _ = surgery.pruned_tensors(keys)
                for key in keys:
                    writer.add(materializer.keys.saved(key), values[key])
        surgery.mark_written(keys)


def _check_describable(surgery: LayerSurgery) -> None:
    """Before anything is written: ``from_pretrained`` can rebuild the pruned structure from its refreshed config
    (every tensor the shape the config gives it, none it would drop)."""
    validate = getattr(surgery.target.config, "validate", None)
    try:
        if callable(validate):
            validate()  # what save_pretrained and from_pretrained run on the config
    except Exception as error:
        raise StructPruneError(f"transformers refuses the pruned config ({str(error).strip().splitlines()[-1][:200]}), "
                               f"so the folder could not be saved or loaded; nothing was written. Keep the attention "
                               f"heads (ratios={{'*attn*': 0}}), pass hidden=False if the hidden width was pruned, or "
                               f"another ratio or target") from error
    try:
        rebuilt = build_skeleton(surgery.target.config, torch.float32)
    except LoadError as error:
        raise StructPruneError(
            f"the pruned model's config is refused by its model class ({error}); nothing was written. Its config "
            f"derives the head size from the hidden size: keep the attention heads (ratios={{'*attn*': 0}} or the "
            f"attention modules' names), or load the model, prune it with slim and save it with sp.save") from error
    expected = {key: tuple(t.shape) for key, t in rebuilt.state_dict(keep_vars=True).items()}
    unknown = sorted(key for key in surgery.output_keys if key not in expected)
    if unknown:
        raise StructPruneError(
            f"the pruned model needs tensors its config cannot describe ({unknown[:3]}): from_pretrained would drop "
            f"them. Bias compensation added biases to layers whose model class has no config flag for one (a "
            f"language-model head when the hidden width is pruned; any layer of a model without an mlp_bias or "
            f"attention_bias flag). Pass compensate=False (or hidden=False where the head is the one), or prune the "
            f"loaded model with slim and save it with sp.save")
    wrong = [(key, shape, expected[key]) for key, shape in surgery.output_keys.items() if expected[key] != shape]
    if wrong:
        key, shape, rebuilds = wrong[0]
        raise StructPruneError(
            f"the config cannot describe the pruned model ({key} is {list(shape)}, the config rebuilds "
            f"{list(rebuilds)}), so the folder would not load with from_pretrained; nothing was written. "
            + " ".join(surgery.notes) + " Pass uniform_blocks=True with a ratio, or a target the repeated blocks "
            "can reach with one width each")


def _check_written(staging: Path, surgery: LayerSurgery) -> None:
    """The staged folder rebuilds: its config gives every written tensor the shape it has."""
    Materializer(build_skeleton(load_config(staging), torch.float32), Checkpoint(staging)).check_shapes()


def prune_pretrained(source: "str | Path", destination: "str | Path", ratio: float = 0.5, *,
                     data: Optional[Iterable[Any]] = None, device: "str | torch.device" = "cpu",
                     activation_memory: int = 2 * 2 ** 30, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     progress: bool = True, **options: Any) -> PretrainedReport:
    """Prune the Hugging Face causal LM saved in ``source`` into a new folder ``destination``, never holding
    the model in memory: one decoder layer at a time, weights read from the safetensors shards when needed.

    Args:
        source: a folder with ``config.json`` and safetensors weights (one file or shards with an index).
        destination: the folder to write (must not exist): shards, index, updated config, and every other
            file of ``source`` (tokenizer, generation config). ``from_pretrained`` loads it.
        ratio: as in :func:`slim` (ignored when ``target`` is given).
        data: calibration batches of token ids (tensors or dicts of model inputs), read once.
        device: where each layer computes while calibrating and verifying (``"cuda"`` on a GPU).
        activation_memory: bytes of hidden states kept in memory; more go to a temporary folder.
        max_shard_bytes: the largest shard written.
        progress: a progress bar per stage.
        **options: the options of :func:`slim` (``target``, ``criterion``, ``hidden``, ``uniform_blocks``,
            ``compensate``, ``verify``, ``ignore``, ``ratios``, ``round_to``, ``scope``, ...), with the same
            meaning and defaults but two: ``criterion="flap"`` (so ``data`` is needed) and ``hidden=False`` (the
            residual width is kept: pruning it costs far more quality, and the head count must then divide a
            pruned hidden size, which LLaMA's config checks). With the same options on a model that fits, the
            pruned weights are the ones ``slim`` gives.
            ``verify`` checks each pruned layer against the original layer with the removed
            channels zeroed, on the hidden states of the first batch. Unless ``compensate`` is given, bias
            compensation skips the layers whose bias the saved config cannot describe (Qwen2's and Mistral's
            projections have no bias flag), so that the folder always loads; ``compensate=True`` refuses such a
            plan instead.

    Returns:
        A :class:`PretrainedReport`.

    Raises:
        LoadError: ``source`` is not a readable Hugging Face folder (no config, no safetensors, a truncated
            shard, a config transformers refuses).
        InvalidOptionError: a bad option, or ``destination`` exists.
        VerificationError: a pruned layer disagrees with the zeroed original (nothing is written).
    """
    for name in _NOT_HERE:
        if name in options:
            raise InvalidOptionError(f"prune_pretrained() does not take {name}=: the model is pruned from its "
                                     f"checkpoint into a new folder, layer by layer")
    # defaults for language models (the other options default as in slim): activation-aware scores, and the
    # residual width kept, which loses far less and keeps the config reloadable (docs/llm.md measures both)
    options = {**LLM_DEFAULTS, **options}
    if data is None and options["criterion"] in ("flap", "wanda"):
        raise InvalidOptionError(f"criterion={options['criterion']!r} scores channels by their activations: pass "
                                 f"calibration batches of token ids, data=[ids, ...], or criterion='l2' (weights only)")
    parsed = Options.parse({"ratio": ratio, **options}, caller="prune_pretrained")
    source, destination = Path(source), Path(destination)
    if destination.exists():
        raise InvalidOptionError(f"{destination} already exists; pass a new folder (nothing is overwritten)")
    seconds: Dict[str, float] = {}
    clock = time.perf_counter()
    checkpoint = Checkpoint(source)
    config = load_config(source)
    dtype = checkpoint_dtype(config, checkpoint)
    skeleton = build_skeleton(config, dtype)
    materializer = Materializer(skeleton, checkpoint, device)
    materializer.check_shapes()
    writer = ShardWriter(destination, max_shard_bytes)  # refuses an unwritable destination before any work
    batches = list(data) if data is not None else [torch.randint(0, int(config.vocab_size), (1, 32),
                                                                 generator=torch.Generator().manual_seed(0))]
    loop = LayerLoop(skeleton, materializer, batches, device, activation_memory)
    try:
        statistics = _calibrate(loop, materializer, skeleton, progress) if data is not None else {}
        seconds["calibrate"] = time.perf_counter() - clock
        clock = time.perf_counter()
        session = StreamedSession(skeleton, _meta_example(batches[0]), parsed, materializer, statistics,
                                  torch.device(device), dtype, reloadable_only="compensate" not in options)
        plan = session.plan(dry_run=True)
        if not plan.drops:
            logger.warning("the plan removes nothing: every prunable group is frozen or ignored")
        seconds["plan"] = time.perf_counter() - clock
        clock = time.perf_counter()
        dropped = plan.element_mask(session.graph)
        surgery = LayerSurgery(session.graph, dropped, session.compensation(dropped), materializer, session.graph.notes)
        _refuse_changed_block_inputs(skeleton, surgery, loop)
        _check_describable(surgery)
        first = HiddenStates(0)
        if parsed.prune.verify:
            if loop.first_input is None:  # no calibration ran: capture the first batch alone
                loop.capture(batches=1)
            assert loop.first_input is not None
            first[0] = loop.first_input
        with writer:
            verdicts = _prune_blocks(loop, surgery, writer, first, parsed.prune.verify,
                                     is_exact(session.graph, dropped), progress)
            _prune_outside(loop, surgery, writer)
            missing = surgery.missing()
            if missing:
                raise StructPruneError(f"internal error: tensors of the pruned model were not written: {missing[:5]}")
            staged = writer.commit(files_from=source, config=surgery.target.config,
                                   check=lambda folder: _check_written(folder, surgery))
        seconds["prune"] = time.perf_counter() - clock
    finally:
        loop.close()
    from ..tools.metrics import count_parameters
    return PretrainedReport(staged, plan, count_parameters(skeleton), count_parameters(surgery.target), verdicts,
                            list(session.graph.notes), seconds, checkpoint.bytes_read, writer.bytes_written)


def _refuse_changed_block_inputs(skeleton: torch.nn.Module, surgery: LayerSurgery, loop: LayerLoop) -> None:
    """The blocks of the pruned model must be called as the original's are (each is checked on the original's
    block arguments): a plan that slices a buffer outside the blocks (rotary frequencies, with
    ``attention="head_dims"``) changes those arguments."""
    inside = tuple(f"{p}." for p in loop.block_prefixes)
    pruned = dict(surgery.target.named_buffers())
    for name, buffer in skeleton.named_buffers():
        if not name.startswith(inside) and name in pruned and pruned[name].shape != buffer.shape:
            raise InvalidOptionError(f"this plan resizes {name}, which the model computes outside its layers and "
                                     f"passes to every layer; layer-by-layer pruning cannot run it. Use "
                                     f"attention='heads' (the default)")


__all__ = ["PretrainedReport", "prune_pretrained"]
