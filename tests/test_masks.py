"""Masks at every granularity: exact sparsity and structure, optimal N:M, scopes, training, baking,
channel masks turned into physical pruning."""
from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import structprune as sp
from structprune.masks import nm_mask

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _layer(kind: str, out: int, inp: int, k: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(inp, out) if kind == "linear" else nn.Conv2d(inp, out, k)


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


@settings(max_examples=40, **SETTINGS)
@given(kind=st.sampled_from(["linear", "conv"]), out=st.integers(1, 12), inp=st.integers(1, 12),
       k=st.integers(1, 3), sparsity=st.floats(0, 0.95), seed=st.integers(0, 99))
def test_element_masks_have_exactly_the_requested_sparsity(kind, out, inp, k, sparsity, seed):
    layer = _layer(kind, out, inp, k, seed)
    report = sp.sparsify(layer, sparsity, "element")
    assert _zeros(layer.weight) == round(sparsity * layer.weight.numel())
    kept = layer.weight[layer.weight != 0].abs()
    dropped = layer.parametrizations.weight.original[layer.weight == 0].abs()
    if kept.numel() and dropped.numel():
        assert dropped.max() <= kept.min()  # the smallest magnitudes went
    assert report.rows[0][2] == "element"


@settings(max_examples=40, **SETTINGS)
@given(kind=st.sampled_from(["linear", "conv"]), out=st.integers(1, 10), inp=st.integers(2, 10), k=st.integers(1, 3),
       sparsity=st.floats(0, 0.95), axis=st.sampled_from(["row", "column"]), seed=st.integers(0, 99))
def test_vector_masks_remove_whole_rows_or_columns(kind, out, inp, k, sparsity, axis, seed):
    layer = _layer(kind, out, inp, k, seed)
    sp.sparsify(layer, sparsity, "vector", axis=axis)
    matrix = layer.weight.detach().reshape(out, -1)
    vectors = matrix if axis == "row" else matrix.t()
    empty = (vectors == 0).all(1)
    assert ((vectors != 0).all(1) | empty).all()  # every vector entirely kept or entirely gone
    assert int(empty.sum()) == round(sparsity * vectors.shape[0])


@settings(max_examples=30, **SETTINGS)
@given(out=st.integers(1, 8), inp=st.integers(1, 8), k=st.integers(2, 3), sparsity=st.floats(0, 0.95),
       seed=st.integers(0, 99))
def test_kernel_masks_remove_whole_kernels(out, inp, k, sparsity, seed):
    layer = _layer("conv", out, inp, k, seed)
    sp.sparsify(layer, sparsity, "kernel")
    kernels = layer.weight.detach().reshape(out * inp, -1)
    empty = (kernels == 0).all(1)
    assert ((kernels != 0).all(1) | empty).all()
    assert int(empty.sum()) == round(sparsity * out * inp)


def _brute_force_nm(scores: torch.Tensor, n: int, m: int) -> float:
    runs = scores.movedim(1, -1).reshape(-1, m)
    return sum(max(run[list(combo)].sum().item() for combo in itertools.combinations(range(m), n)) for run in runs)


@settings(max_examples=40, **SETTINGS)
@given(m=st.integers(2, 5), data=st.data())
def test_nm_masks_are_optimal_and_have_the_pattern(m, data):
    n = data.draw(st.integers(1, m - 1))
    out, groups = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    conv = data.draw(st.booleans())
    shape = (out, groups * m, 2, 2) if conv else (out, groups * m)
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    mask = nm_mask(scores, n, m)
    runs = mask.movedim(1, -1).reshape(-1, m)
    assert (runs.sum(1) == n).all()  # exactly n kept in every run of m along the input dimension
    assert (scores * mask).sum().item() == pytest.approx(_brute_force_nm(scores, n, m), rel=1e-5)


def test_two_four_on_a_model_skips_what_does_not_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
    report = sp.sparsify(model, granularity="nm", n=2, m=4)
    assert report.skipped == ["0.weight"]  # 3 input channels: no run of 4
    assert report.by_granularity() == {"2:4": 0.5}


def test_global_scope_takes_more_from_the_less_important_layer():
    torch.manual_seed(0)
    big, small = nn.Linear(16, 16), nn.Linear(16, 16)
    with torch.no_grad():
        big.weight.mul_(10)
    local, global_ = nn.ModuleList([copy.deepcopy(big), copy.deepcopy(small)]), nn.ModuleList([big, small])
    sp.sparsify(local, 0.5, "element")
    sp.sparsify(global_, 0.5, "element", scope="global")
    assert _zeros(local[0].weight) == _zeros(local[1].weight) == 128
    assert _zeros(global_[0].weight) + _zeros(global_[1].weight) == 256
    assert _zeros(global_[1].weight) > 200  # the small-magnitude layer pays


def test_training_keeps_the_zeros_and_remove_masks_bakes_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sp.sparsify(model, 0.6, "element")
    zeros = [layer.weight == 0 for layer in (model[0], model[2])]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        loss = F.cross_entropy(model(torch.randn(6, 8)), torch.randint(0, 4, (6,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer, zero in zip((model[0], model[2]), zeros):
        assert (layer.weight[zero] == 0).all()
    sp.remove_masks(model)
    assert type(model[0]) is nn.Linear and isinstance(model[0].weight, nn.Parameter)
    assert torch.equal(model[0].weight == 0, zeros[0]) and sp.sparsity_report(model).rows == []


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                  nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(h + self.body(h))
        return self.head(h.mean((2, 3)))


@settings(max_examples=15, **SETTINGS)
@given(sparsity=st.floats(0.1, 0.9), scope=st.sampled_from(["local", "global"]),
       criterion=st.sampled_from(["l1", "l2", "random"]), seed=st.integers(0, 50))
def test_channel_masks_become_physical_pruning_with_identical_outputs(sparsity, scope, criterion, seed):
    torch.manual_seed(seed)
    model = SmallResNet().eval()
    for bn in (model.stem[1], model.body[1], model.body[4]):  # trained-looking norms
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.2, 0.2)
    x = torch.randn(2, 3, 6, 6)
    sp.sparsify(model, sparsity, "channel", example_input=x, scope=scope, criterion=criterion, seed=seed)
    small = sp.apply_masks(model, x)
    assert sp.count_parameters(small) < sp.count_parameters(SmallResNet())
    # coupled channels are masked alike: the residual sum's channels are zero in stem and body alike
    stem_zero = (model.stem[0].weight == 0).flatten(1).all(1)
    assert torch.equal(stem_zero, (model.body[3].weight == 0).flatten(1).all(1))
    assert small.stem[0].out_channels == 16 - int(stem_zero.sum())
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_gradient_criteria_need_data_and_use_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(sp.StructPruneError, match="data"):
        sp.sparsify(model, 0.5, criterion="taylor")
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    report = sp.sparsify(model, 0.5, criterion="taylor", data=batches)
    assert report.total == pytest.approx(0.5)


def test_semi_structured_export_warns_on_cpu_and_keeps_the_masked_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    sp.sparsify(model, granularity="nm", n=2, m=4)
    before = model[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sp.to_semi_structured(model) is model
    assert any("CUDA" in str(w.message) for w in caught)
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("capability, cusparselt, requested, expected", [
    ((9, 0), True, None, "cusparselt"),       # Hopper: cuSPARSELt is the only backend that runs
    ((9, 0), True, "cusparselt", "cusparselt"),
    ((8, 0), True, None, "cusparselt"),       # Ampere: cuSPARSELt preferred when torch has it ...
    ((8, 6), False, None, "cutlass"),         # ... CUTLASS otherwise
    ((8, 9), True, "cutlass", "cutlass"),     # an explicit choice is honoured where it runs
    ((10, 0), True, None, "cusparselt"),
])
def test_semi_structured_backend_choice(capability, cusparselt, requested, expected):
    from structprune.masks.semi_structured import choose_backend

    assert choose_backend(capability, cusparselt, requested) == expected


@pytest.mark.parametrize("capability, cusparselt, requested, match", [
    ((9, 0), False, None, "sm_90.*sm_80-sm_89"),       # Hopper without cuSPARSELt: CUTLASS refuses
    ((9, 0), True, "cutlass", "cutlass.*sm_90.*backend='cusparselt'"),
    ((8, 0), False, "cusparselt", "cusparselt.*not available.*backend='cutlass' works"),
    ((7, 5), True, None, "sm_75.*no sparse tensor cores"),
])
def test_semi_structured_backend_refusals_say_why(capability, cusparselt, requested, match):
    from structprune.masks.semi_structured import choose_backend

    with pytest.raises(sp.StructPruneError, match=match):
        choose_backend(capability, cusparselt, requested)


def test_semi_structured_backend_name_is_checked_first():
    from structprune.masks.semi_structured import choose_backend

    with pytest.raises(sp.InvalidOptionError, match="backend must be one of 'cusparselt', 'cutlass'"):
        choose_backend((9, 0), True, "cuSPARSELt")
    model = nn.Sequential(nn.Linear(16, 16))  # no 2:4 mask: the bad option is still what is reported
    with pytest.raises(sp.InvalidOptionError, match="backend"):
        sp.to_semi_structured(model, backend="triton")
    sp.sparsify(model, granularity="nm", n=2, m=4)
    with pytest.warns(UserWarning, match="CUDA"):  # a valid backend on a CPU model: still warn, stay dense
        assert sp.to_semi_structured(model, backend="cutlass") is model


@pytest.mark.parametrize("capability, built, dtype, requested, expected", [
    ((9, 0), True, torch.float16, None, "cusparselt"),
    ((8, 0), True, torch.float32, None, "cutlass"),        # cuSPARSELt takes no float32: CUTLASS does
    ((9, 0), True, torch.float32, None, "float16"),        # ... but not on Hopper: the error says to cast
    ((8, 0), True, torch.float32, "cusparselt", "dtype"),
    ((9, 0), False, torch.bfloat16, None, "sm_90"),
])
def test_semi_structured_backend_follows_card_and_dtype(monkeypatch, capability, built, dtype, requested, expected):
    from structprune.masks.semi_structured import semi_structured_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: built)
    weight = torch.zeros(64, 64, dtype=dtype)  # only its dtype and device are read
    if expected in ("cusparselt", "cutlass"):
        assert semi_structured_backend(weight, requested) == expected
    else:
        with pytest.raises(sp.StructPruneError, match=expected):
            semi_structured_backend(weight, requested)


def test_bad_arguments_are_rejected_with_specific_errors():
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="granularity"):
        sp.sparsify(layer, 0.5, "block")
    with pytest.raises(ValueError, match="sparsity"):
        sp.sparsify(layer, 1.5)
    with pytest.raises(sp.StructPruneError, match="example_input"):
        sp.sparsify(layer, 0.5, "channel")
    with pytest.raises(sp.StructPruneError, match="no tensor"):
        sp.sparsify(nn.ReLU(), 0.5)


class NamedParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, 8))
        self.proj = nn.Conv1d(8, 8, 3)

    def forward(self, x):
        return self.proj((x @ self.table).transpose(1, 2))  # x: (B, L, 8)


def test_any_named_parameter_and_conv1d_can_be_masked():
    torch.manual_seed(0)
    model = NamedParameter()
    report = sp.sparsify(model, 0.25, "element", targets=["table"])
    assert [row[0] for row in report.rows] == ["table"] and _zeros(model.table) == 16
    sp.sparsify(model, granularity="nm", n=1, m=4, targets=["proj.weight"])
    runs = (model.proj.weight != 0).movedim(1, -1).reshape(-1, 4)
    assert (runs.sum(1) == 1).all()
    assert model(torch.randn(2, 5, 8)).shape == (2, 8, 3)  # still runs
