"""Property tests: random architectures (tests/archgen.py) through the public API.

Every falsifying example hypothesis prints is a repro::

    from tests.archgen import ArchSpec
    model, x = ArchSpec(spec={...}, seed=...).build()
    small, report = structprune.slim_with_report(model, x, ratio)

Properties:
1. slim succeeds, output structure/shapes kept, params never grow (and shrink when there is
   something to cut), report.verification.passed.
2. numerics, checked independently of the report: ratio 0 is a no-op on outputs; with exact
   verification the reported error is tiny; and the pruned model equals the original whose
   consumers ignore the dropped channels (a reference we rebuild ourselves from the weights).
3. the caller's model is untouched; the result is the same class with the same state_dict keys.
4. the pruned model runs on other batch sizes (and spatial sizes, when the head allows).
"""
from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import structprune as sp

try:
    from tests.archgen import ArchSpec, arch_specs
except ImportError:  # tests/ on sys.path (pytest rootdir insertion) but not the repo root
    from archgen import ArchSpec, arch_specs  # type: ignore[no-redef]

SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# typical ratios often, plus arbitrary floats (hypothesis favours tiny/boundary values)
RATIOS = st.one_of(st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9]),
                   st.floats(min_value=0.0, max_value=0.9, allow_nan=False))
POS_RATIOS = st.one_of(st.sampled_from([0.3, 0.5, 0.75, 0.9]),
                       st.floats(min_value=0.05, max_value=0.9, allow_nan=False))
ANY_ARCH = arch_specs()
PER_CHANNEL_ARCH = arch_specs(exclude_stat_norms=True)  # no GroupNorm/InstanceNorm/LayerNorm


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster and plays well on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _build(arch: ArchSpec):
    note("architecture:\n" + arch.describe())
    return arch.build()


def _leaves(out):
    """(structure, [tensors]) of a model output: a tensor, a tuple/list or a dict of tensors."""
    if isinstance(out, torch.Tensor):
        return ("tensor",), [out]
    if isinstance(out, (tuple, list)):
        return (type(out).__name__, len(out)), list(out)
    if isinstance(out, dict):
        return ("dict", tuple(out.keys())), list(out.values())
    raise AssertionError(f"unexpected output type {type(out)}")


def _assert_same_structure(ref, got, what="output"):
    s_ref, t_ref = _leaves(ref)
    s_got, t_got = _leaves(got)
    assert s_got == s_ref, f"{what} structure changed: {s_ref} -> {s_got}"
    for i, (a, b) in enumerate(zip(t_ref, t_got)):
        assert isinstance(b, torch.Tensor), f"{what}[{i}] is {type(b)}"
        assert b.shape == a.shape, f"{what}[{i}] shape {tuple(a.shape)} -> {tuple(b.shape)}"
        assert b.dtype == a.dtype, f"{what}[{i}] dtype {a.dtype} -> {b.dtype}"


def _max_diff(ref, got) -> float:
    _, t_ref = _leaves(ref)
    _, t_got = _leaves(got)
    return max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(t_ref, t_got))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(model, x):
    with torch.no_grad():
        return model(x)


def _cuttable(model, x, ratio) -> bool:
    """True when some producing layer of a prunable group must lose >= 1 of its unfrozen units
    (the planner applies ``floor(ratio * n)`` per layer)."""
    for g in sp.DependencyGraph(model, x).groups:
        if not g.prunable:
            continue
        origins = g.unit_origin[~g.frozen_units]
        if any(int(ratio * np.sum(origins == o) + 1e-9) >= 1 for o in np.unique(origins)):
            return True
    return False


_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "num_groups", "num_channels",
          "normalized_shape", "in_features", "out_features", "num_parameters", "kernel_size",
          "stride", "padding")


def _snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attrs = {(name, a): copy.deepcopy(getattr(m, a))
             for name, m in model.named_modules() for a in _ATTRS if hasattr(m, a)}
    classes = {name: type(m) for name, m in model.named_modules()}
    params = {name: (p.requires_grad, type(p)) for name, p in model.named_parameters()}
    return state, attrs, classes, params, model.training


# ---------------------------------------------------------------------------------------------
# an independent "dropped channels contribute nothing" reference
# ---------------------------------------------------------------------------------------------
def _rows_view(mod: nn.Module, w: torch.Tensor):
    """Weight as (out, in_per_group, k) and its groups; None for layouts we do not model."""
    if isinstance(mod, nn.Linear):
        return w.reshape(w.shape[0], w.shape[1], 1), 1
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        # (in, out/g, *k) -> (out, in/g, k): group gi's outputs read inputs [gi*in/g, ...)
        g, cin, cout_g = mod.groups, w.shape[0], w.shape[1]
        v = w.reshape(g, cin // g, cout_g, -1).permute(0, 2, 1, 3)
        return v.reshape(g * cout_g, cin // g, -1), g
    if isinstance(mod, nn.modules.conv._ConvNd):
        return w.reshape(w.shape[0], w.shape[1], -1), mod.groups
    return None


def _from_rows(mod: nn.Module, v: torch.Tensor, shape) -> torch.Tensor:
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        g = mod.groups
        cin, cout_g = shape[0], shape[1]
        w = v.reshape(g, cout_g, cin // g, -1).permute(0, 2, 1, 3)
        return w.reshape(shape)
    return v.reshape(shape)


def _kept_inputs(v: torch.Tensor, vp: torch.Tensor, groups: int):
    """Match each pruned (row, column) kernel vector to the original weight.

    Returns {original row: set of original global input indices kept} or None when the
    matching is ambiguous (coincident float values). Raises when a pruned kernel vector does
    not exist in the original (the pruned weight is not a slice of the original).
    """
    out_ch, in_loc, _ = v.shape
    per_group_out = out_ch // groups
    v, vp = v.contiguous().numpy(), vp.contiguous().numpy()
    index = defaultdict(list)
    for o in range(out_ch):
        for i in range(in_loc):
            index[v[o, i].tobytes()].append((o, i))
    kept: dict[int, set] = {}
    for op_ in range(vp.shape[0]):
        hits = []
        rows = None
        for ip in range(vp.shape[1]):
            pos = index.get(vp[op_, ip].tobytes())
            assert pos, (f"pruned weight row {op_} col {ip} is not a slice of the original "
                         f"weight (values changed?)")
            hits.append(pos)
            rows = {o for o, _ in pos} if rows is None else rows & {o for o, _ in pos}
        assert rows, f"pruned weight row {op_} matches no single original row"
        if len(rows) != 1:
            return None
        (o,) = rows
        assert o not in kept, f"original row {o} appears twice in the pruned weight"
        cols = []
        for pos in hits:
            cand = [i for oo, i in pos if oo == o]
            if len(cand) != 1:
                return None
            cols.append((o // per_group_out) * in_loc + cand[0])
        assert len(set(cols)) == len(cols), f"original row {o}: an input column is duplicated"
        kept[o] = set(cols)
    return kept


def _zeroed_reference(model: nn.Module, small: nn.Module):
    """Original model with every kept output's weights on dropped input channels set to zero.

    When every op on a pruned axis is per-channel, a dropped channel can only influence the
    output through the contractions that consume it, so this model must equal the pruned one.
    """
    ref = copy.deepcopy(model)
    small_mods = dict(small.named_modules())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or _rows_view(mod, w) is None:
                continue
            smod = small_mods[name]
            wp = smod.weight
            v, groups = _rows_view(mod, w)
            got = _rows_view(smod, wp)
            if got is None:
                return None
            vp, _ = got
            kept = _kept_inputs(v.detach().clone(), vp.detach().clone(), groups)
            if kept is None:
                event("independent reference: ambiguous weight match, skipped")
                return None
            vz = v.detach().clone()
            per_group_out = v.shape[0] // groups
            for o, cols in kept.items():
                base = (o // per_group_out) * v.shape[1]
                for i in range(v.shape[1]):
                    if base + i not in cols:
                        vz[o, i] = 0
            w.copy_(_from_rows(mod, vz, w.shape))
    return ref


# ---------------------------------------------------------------------------------------------
# property 1: slim works, shapes kept, params shrink, verification passes
# ---------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None, suppress_health_check=SUPPRESS)
@given(arch=ANY_ARCH, ratio=RATIOS)
def test_slim_keeps_outputs_and_shrinks(arch, ratio):
    model, x = _build(arch)
    y = _run(model, x)
    small, report = sp.slim_with_report(model, x, ratio)
    assert small is not model
    assert type(small) is type(model)
    y_small = _run(small, x)
    _assert_same_structure(y, y_small)

    before, after = _n_params(model), _n_params(small)
    note(f"params {before} -> {after}")
    assert after <= before
    assert report.params_before == before
    assert report.params_after == after
    if ratio >= 0.3 and _cuttable(model, x, ratio):
        assert after < before, "a prunable group exists at ratio >= 0.3 but nothing was removed"
    event("pruned" if after < before else "unchanged")

    assert report.verification is not None
    assert report.verification.passed, f"verification failed: {report.verification}"
    event(f"verification exact={report.verification.exact}")


# ---------------------------------------------------------------------------------------------
# property 2: numerics
# ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=SUPPRESS)
@given(arch=PER_CHANNEL_ARCH)
def test_ratio_zero_is_a_no_op(arch):
    model, x = _build(arch)
    y = _run(model, x)
    small, report = sp.slim_with_report(model, x, 0.0)
    y_small = _run(small, x)
    _assert_same_structure(y, y_small)
    assert _n_params(small) == _n_params(model)
    diff = _max_diff(y, y_small)
    assert diff <= 1e-5, f"ratio 0 changed the output by {diff}"


@settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESS)
@given(arch=st.one_of(PER_CHANNEL_ARCH, ANY_ARCH), ratio=POS_RATIOS)
def test_exact_verification_reports_small_error(arch, ratio):
    model, x = _build(arch)
    small, report = sp.slim_with_report(model, x, ratio)
    v = report.verification
    assert v is not None and v.passed
    event(f"exact={v.exact}")
    if not arch.has_stat_norm:
        event(f"per-channel model, exact={v.exact}")
    if v.exact:
        assert v.max_relative_error < 1e-4, f"exact verification with max_relative_error={v.max_relative_error}"


@settings(max_examples=80, deadline=None, suppress_health_check=SUPPRESS)
@given(arch=PER_CHANNEL_ARCH, ratio=POS_RATIOS)
def test_matches_independent_zeroed_reference(arch, ratio):
    """Rebuild the reference from the weights alone: no library internals involved. Compensation is off:
    it keeps a channel that is constant whatever the input (a ReLU-dead conv's bias) at its value instead of
    dropping it, and has its own property in test_compensation.py."""
    model, x = _build(arch)
    small = sp.slim(model, x, ratio, compensate=False)
    ref = _zeroed_reference(model, small)
    if ref is None:
        return
    y_ref, y_small = _run(ref, x), _run(small, x)
    _assert_same_structure(y_ref, y_small)
    _, t_ref = _leaves(y_ref)
    _, t_small = _leaves(y_small)
    for i, (a, b) in enumerate(zip(t_ref, t_small)):
        scale = max(1.0, float(a.abs().max()) if a.numel() else 1.0)
        err = float((a - b).abs().max()) if a.numel() else 0.0
        assert err <= 1e-4 * scale, f"output {i}: pruned vs zeroed reference differ by {err}"
    event("reference checked, pruned" if _n_params(small) < _n_params(model)
          else "reference checked, unchanged")


# ---------------------------------------------------------------------------------------------
# property 3: the caller's model is untouched; the result is the same model, smaller
# ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=SUPPRESS)
@given(arch=ANY_ARCH, ratio=RATIOS)
def test_caller_model_untouched(arch, ratio):
    model, x = _build(arch)
    x_before = x.clone()
    state, attrs, classes, params, training = _snapshot(model)
    small = sp.slim(model, x, ratio)

    state2, attrs2, classes2, params2, training2 = _snapshot(model)
    assert state2.keys() == state.keys()
    for k in state:
        assert state2[k].shape == state[k].shape, f"{k}: shape changed"
        assert torch.equal(state2[k], state[k]), f"{k}: values changed"
    assert attrs2 == attrs
    assert classes2 == classes
    assert params2 == params
    assert training2 == training
    assert torch.equal(x, x_before), "example input modified"

    # guarantee 3 of the design: same classes, same attribute names, same state_dict keys
    assert small.state_dict().keys() == model.state_dict().keys()
    assert {n: type(m) for n, m in small.named_modules()} == classes
    for n, p in small.named_parameters():
        assert isinstance(p, nn.Parameter) and p.requires_grad == params[n][0], n
    for n, t in small.state_dict().items():
        assert t.dim() == state[n].dim(), f"{n}: rank changed"
        assert all(a <= b for a, b in zip(t.shape, state[n].shape)), f"{n}: grew"
        if "running_var" in n:
            assert bool((t > 0).all()), f"{n}: non-positive running_var"


# ---------------------------------------------------------------------------------------------
# property 4: other inputs
# ---------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESS)
@given(arch=ANY_ARCH, ratio=RATIOS, batch=st.integers(1, 4), grow=st.integers(1, 6))
def test_other_batch_and_spatial_sizes(arch, ratio, batch, grow):
    model, x = _build(arch)
    small = sp.slim(model, x, ratio)
    if batch == arch.spec["batch"]:
        batch = batch % 4 + 1
    x_b = arch.make_input(batch=batch, seed=arch.seed + 7)
    _assert_same_structure(_run(model, x_b), _run(small, x_b), "other-batch output")
    if arch.spatial_flexible:
        x_s = arch.make_input(batch=batch, size=arch.spec["size"] + grow, seed=arch.seed + 8)
        _assert_same_structure(_run(model, x_s), _run(small, x_s), "other-size output")
        event("spatial size changed too")


# ---------------------------------------------------------------------------------------------
# property 5: the torch.export path (ATen-level rules) agrees with the fx path (module rules)
# ---------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=SUPPRESS)
@given(arch=ANY_ARCH, ratio=POS_RATIOS)
def test_export_tracer_agrees_with_fx(arch, ratio):
    model, x = _build(arch)
    torch.manual_seed(0)
    fx_small, fx_report = sp.slim_with_report(model, x, ratio, tracer="fx")
    torch.manual_seed(0)
    ex_small, ex_report = sp.slim_with_report(model, x, ratio, tracer="export")
    assert ex_report.verification.passed, f"export path: {ex_report.verification}"
    # the ATen graph may freeze more (shape constants are literal there), never less
    assert ex_report.params_after >= fx_report.params_after
    _assert_same_structure(_run(model, x), _run(ex_small, x))
