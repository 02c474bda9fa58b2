"""Channel masks: whole coupled channels masked in every tensor that shares them, and their removal.

``sparsify(model, s, "channel", example_input=x)`` plans like :func:`~structprune.slim` (the same
session, options and criteria) but masks instead of removing; :func:`apply_masks` turns channel masks
into physical pruning, checked by the one verifier.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import InvalidOptionError, VerificationError
from ..graph.capture import Inputs, eval_mode, output_tensors
from ..options import Options, check_names, require_module
from ..pipeline import PruningSession
from ..planning.planner import Plan
from .granularities import Granularity, MaskRequest, register_granularity
from .parametrize import SparsityReport, baked_copy, original, set_mask, sparsity_report

# slim's planning and trace options that channel masks take (sparsity, scope and criterion are sparsify's own)
CHANNEL_OPTIONS = ("ignore", "ratios", "round_to", "hidden", "max_group_ratio", "normalize", "reduction", "tracer",
                   "attention")


class Channel(Granularity):
    """Whole channels, coupled across every layer that shares them (through the engine's groups)."""

    name = "channel"

    def apply(self, request: MaskRequest) -> SparsityReport:
        if request.example_input is None:
            raise InvalidOptionError("channel masks need example_input=... to find which channels are coupled")
        check_names(request.options, CHANNEL_OPTIONS, "sparsify")
        options = Options.from_kwargs(
            ratio=request.sparsity, scope=request.scope, criterion=request.criterion, data=request.context.data,
            loss_fn=request.context.loss_fn, seed=request.context.seed, verify=False, **request.options)
        session = PruningSession(request.model, request.example_input, options)
        dropped = session.plan().element_mask(session.graph)
        model = request.model
        for space in session.graph.spaces:
            gone = space.of(dropped)
            path, _, attr = space.tensor.rpartition(".")
            module = model.get_submodule(path)
            if not gone.any() or not (attr in module._parameters or parametrize.is_parametrized(module, attr)):
                continue  # buffers (running statistics) need no mask: the affine parameters zero the channel
            shape = [1] * original(module, attr).ndim
            shape[space.dim] = space.size
            keep = torch.as_tensor(~gone).reshape(shape).expand(original(module, attr).shape)
            set_mask(module, attr, keep, "channel")
        return sparsity_report(model)


register_granularity(Channel())


def apply_masks(model: nn.Module, example_input: Any, **options: Any) -> nn.Module:
    """A physically smaller copy of a channel-masked ``model``: every channel whose slices are masked
    in every parameter that shares it is removed (through the engine's groups), other masks are baked
    in. ``example_input`` takes every form :func:`~structprune.slim` takes (a tensor, a tuple, a dict of
    keyword arguments), and so do the trace options (``tracer``, ``attention``). The copy's outputs
    equal the masked model's (checked; :class:`~structprune.VerificationError` otherwise)."""
    require_module(model)
    # masks baked into plain weights: the analysis then sees exact zeros, and the caller's model keeps its masks
    twin = baked_copy(model)
    session = PruningSession(twin, example_input,
                             Options.parse(options, allowed=("tracer", "attention"), caller="apply_masks"))
    graph = session.graph
    params = dict(twin.named_parameters(remove_duplicate=False))
    drops = {}
    for group in graph.prunable_groups:
        zero = np.ones(group.n_units, bool)
        seen = False
        for space, index in zip(group.spaces, group.unit_index):
            tensor = params.get(space.tensor)
            if tensor is None:
                continue
            seen = True
            nonzero = tensor.detach().ne(0).movedim(space.dim, 0).reshape(space.size, -1).any(1).cpu().numpy()
            alive = np.zeros(group.n_units, bool)
            # a unit is alive if any of its slices in any member tensor holds a non-zero: unbuffered OR per unit
            np.logical_or.at(alive, index, nonzero)
            zero &= ~alive
        units = np.flatnonzero(zero & ~group.frozen_units)
        # inexact groups (LayerNorm over them) are left alone: removing a zeroed channel there would change the
        # statistics, so the result could no longer equal the masked model
        if seen and units.size and group.exact and units.size < group.n_units:
            drops[group.id] = units
    plan = Plan(drops)
    small, _ = session.apply(plan)  # verified against the zeroed (masked) twin
    _check_same(model, small, Inputs.from_example(example_input), plan.n_dropped)
    return small


def _check_same(masked: nn.Module, small: nn.Module, inputs: Inputs, n_removed: int) -> None:
    """The removal must not change what the masked model computes (masks are exact zeros)."""
    with torch.no_grad(), eval_mode(masked), eval_mode(small):
        fresh = inputs.cloned()
        reference = output_tensors(masked(*fresh.args, **fresh.kwargs))
        fresh = inputs.cloned()
        result = output_tensors(small(*fresh.args, **fresh.kwargs))
    for ref, out in zip(reference, result):
        if ref.is_floating_point() and not torch.allclose(ref, out, rtol=1e-4,
                                                          atol=1e-5 * max(1.0, ref.abs().max().item())):
            raise VerificationError(f"the pruned copy differs from the masked model by "
                                    f"{(ref - out).abs().max().item():.3g} ({n_removed} channels removed)")
