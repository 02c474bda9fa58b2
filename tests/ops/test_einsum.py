"""torch.einsum (structprune/ops/contraction.py): every equation form, under both tracers, pruned
and verified exactly (the pruned model equals the original with the removed channels zeroed)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import outputs, slim_exact
from hypothesis import given, settings
from hypothesis import strategies as st

import structprune as sp
from structprune.ops.contraction import parse_equation

TRACERS = ["fx", "export"]


def _seeded(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).eval()


def _param(*shape):
    return nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5)


def _kept(original: torch.Tensor, pruned: torch.Tensor, dim: int) -> list:
    """Indices of ``original`` along ``dim`` that survive in ``pruned`` (matched exactly, in order)."""
    kept = []
    for row in pruned.unbind(dim):
        matches = [i for i, r in enumerate(original.unbind(dim)) if torch.equal(r, row)]
        assert len(matches) == 1
        kept.append(matches[0])
    assert kept == sorted(kept)
    return kept


# ----- the equation parser --------------------------------------------------------------------------------
@pytest.mark.parametrize("equation, ndims, operands, output", [
    ("bld,od->blo", [3, 2], ["bld", "od"], "blo"),
    (" b l d , o d -> b l o ", [3, 2], ["bld", "od"], "blo"),
    ("ij,jk", [2, 2], ["ij", "jk"], "ik"),
    ("ba", [2], ["ba"], "ab"),
    ("Ab,bA", [2, 2], ["Ab", "bA"], ""),
    ("ii->i", [2], ["ii"], "i"),
    ("iij", [3], ["iij"], "j"),
])
def test_parse_letters(equation, ndims, operands, output):
    parsed = parse_equation(equation, ndims)
    assert parsed.operands == [list(term) for term in operands]
    assert parsed.output == list(output)


def test_parse_ellipsis_broadcasts_from_the_right():
    parsed = parse_equation("...i,oi->...o", [4, 2])
    e1, e0 = ("...", 1), ("...", 0)
    assert parsed.operands == [[("...", 2), e1, e0, "i"], ["o", "i"]]
    assert parsed.output == [("...", 2), e1, e0, "o"]
    implicit = parse_equation("i...,...j", [3, 2])  # implicit: ellipsis axes first, then sorted letters
    assert implicit.output == [e1, e0, "i", "j"]
    assert parse_equation("...ij->ij", [4]).output == ["i", "j"]  # an ellipsis left out is summed


@pytest.mark.parametrize("equation, ndims", [("ij,jk", [2]), ("ij", [3]), ("i.j", [2]), ("i1", [2]),
                                             ("ij->ii", [2])])
def test_parse_rejects_malformed_equations(equation, ndims):
    with pytest.raises(ValueError):
        parse_equation(equation, ndims)


# ----- models -----------------------------------------------------------------------------------------------
class EinsumLinear(nn.Module):
    """``einsum("bld,od->blo")`` with a weight and a bias, then an ``nn.Linear`` that consumes it."""

    def __init__(self, d=8, hidden=16, out=4):
        super().__init__()
        self.weight, self.bias = _param(hidden, d), nn.Parameter(torch.randn(hidden))
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(F.gelu(torch.einsum("bld,od->blo", x, self.weight) + self.bias))


class ChainedEinsum(nn.Module):
    """Two einsum linears with a ReLU between; the second passes its operands as one list."""

    def __init__(self, d=8, hidden=16, out=4):
        super().__init__()
        self.w1, self.w2 = _param(hidden, d), _param(out, hidden)

    def forward(self, x):
        h = torch.relu(torch.einsum("bld,od->blo", x, self.w1))
        return torch.einsum("blh,oh->blo", [h, self.w2])


class EinsumAttention(nn.Module):
    """Attention written with einsum; heads split by reshape (``transposed``: to (b, h, n, d) first,
    else the einsum reads the (b, n, h, d) views directly)."""

    def __init__(self, dim=16, heads=4, head_dim=4, transposed=True):
        super().__init__()
        self.num_heads, self.head_dim, self.transposed = heads, head_dim, transposed
        self.scale = head_dim ** -0.5
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.proj = nn.Linear(heads * head_dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 24), nn.Linear(24, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim) for p in (self.q, self.k, self.v))
        if self.transposed:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            attn = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * self.scale, dim=-1)
            o = torch.einsum("bhqk,bhkd->bhqd", attn, v).transpose(1, 2)
        else:
            attn = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale, dim=-1)
            o = torch.einsum("bhqk,bkhd->bqhd", attn, v)
        x = x + self.proj(o.reshape(b, n, -1))
        return x + self.fc2(F.gelu(self.fc1(x)))


class EllipsisEinsum(nn.Module):
    """``"...i,oi->...o"`` between two linears: consumes one hidden width and produces the next."""

    def __init__(self, d=8, hidden=16, mid=12, out=4):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(d, hidden), nn.Linear(mid, out)
        self.weight = _param(mid, hidden)

    def forward(self, x):
        h = torch.relu(self.fc_in(x))
        return self.fc_out(torch.relu(torch.einsum("...i,oi->...o", h, self.weight)))


class ImplicitEinsum(nn.Module):
    """``"ij,jk"``: no ``->``, the output is ``"ik"``."""

    def __init__(self, d=8, hidden=16, mid=12, out=4):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(d, hidden), nn.Linear(mid, out)
        self.weight = _param(hidden, mid)

    def forward(self, x):
        return self.fc_out(torch.relu(torch.einsum("ij,jk", torch.relu(self.fc_in(x)), self.weight)))


class DiagonalScale(nn.Module):
    """``"bi,ii->bi"``: the diagonal of a square parameter scales each channel (rows and columns of
    the parameter lose the same indices)."""

    def __init__(self, d=8, hidden=16, out=4):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(d, hidden), nn.Linear(hidden, out)
        self.diag = nn.Parameter(torch.randn(hidden, hidden))

    def forward(self, x):
        return self.fc_out(torch.einsum("bi,ii->bi", torch.relu(self.fc_in(x)), self.diag))


class TraceOfOuter(nn.Module):
    """An outer product ``"bi,bj->bij"`` followed by its trace ``"bii->b"``: the two linears end up
    coupled channel for channel."""

    def __init__(self, d=8, hidden=16):
        super().__init__()
        self.a, self.b = nn.Linear(d, hidden), nn.Linear(d, hidden)

    def forward(self, x):
        return torch.einsum("bii->b", torch.einsum("bi,bj->bij", self.a(x), self.b(x)))


class ThreeOperands(nn.Module):
    """``"bi,ij,jk->bk"``: a low-rank product of two weights; all three widths are prunable."""

    def __init__(self, d=8, hidden=16, rank=12, mid=10, out=4):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(d, hidden), nn.Linear(mid, out)
        self.u, self.v = _param(hidden, rank), _param(rank, mid)

    def forward(self, x):
        h = torch.relu(self.fc_in(x))
        return self.fc_out(torch.relu(torch.einsum("bi,ij,jk->bk", h, self.u, self.v)))


class ConvMix(nn.Module):
    """A conv feature map mixed across channels by ``"bchw,oc->bohw"``, then another conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(12, 4, 3, padding=1)
        self.mix = _param(12, 8)

    def forward(self, x):
        f = torch.relu(self.conv1(x))
        return self.conv2(torch.relu(torch.einsum("bchw,oc->bohw", f, self.mix)))


class SublistEinsum(nn.Module):
    """The sublist format ``einsum(x, [..., 0], w, [1, 0], [..., 1])`` (torch.export turns it into an
    equation; fx records the sublists)."""

    def __init__(self, d=8, hidden=16, out=4):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(d, hidden), nn.Linear(12, out)
        self.weight = _param(12, hidden)

    def forward(self, x):
        h = torch.relu(self.fc_in(x))
        return self.fc_out(torch.relu(torch.einsum(h, [..., 0], self.weight, [1, 0], [..., 1])))


# ----- pruning ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tracer", TRACERS)
def test_einsum_linear_prunes_its_output_width(tracer):
    model = _seeded(EinsumLinear)
    x = torch.randn(2, 5, 8)
    small, _ = slim_exact(model, x, 0.5, tracer=tracer)
    assert small.weight.shape == (8, 8) and small.bias.shape == (8,) and small.head.in_features == 8
    assert outputs(small, x).shape == (2, 5, 4)


@pytest.mark.parametrize("tracer", TRACERS)
def test_chained_einsum_linears_prune_the_hidden_width(tracer):
    model = _seeded(ChainedEinsum)
    x = torch.randn(2, 5, 8)
    small = sp.slim(model, x, 0.5, tracer=tracer)
    assert small.w1.shape == (8, 8) and small.w2.shape == (4, 8)
    # independent of the library's verifier: zero the dropped hidden channels by hand
    kept = _kept(model.w1, small.w1, 0)
    reference = _seeded(ChainedEinsum)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.w2[:, [i for i in range(16) if i not in kept]] = 0
    torch.testing.assert_close(outputs(small, x), outputs(reference, x), rtol=1e-5, atol=1e-6)
    _, report = slim_exact(model, x, 0.5, tracer=tracer)
    assert report.verification.exact


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("transposed", [True, False])
def test_einsum_attention_drops_whole_heads(tracer, transposed):
    model = _seeded(EinsumAttention, transposed=transposed)
    x = torch.randn(2, 6, 16)
    small, _ = slim_exact(model, x, 0.5, tracer=tracer, hidden=False)
    assert small.num_heads == 2 and small.head_dim == 4
    for projection in (small.q, small.k, small.v):
        assert projection.out_features == 8
    assert small.proj.in_features == 8 and small.fc1.out_features == 12
    assert outputs(small, x).shape == x.shape


@pytest.mark.parametrize("tracer", TRACERS)
def test_einsum_attention_head_dims_mode(tracer):
    model = _seeded(EinsumAttention)
    x = torch.randn(2, 6, 16)
    small, _ = slim_exact(model, x, 0.5, tracer=tracer, hidden=False, attention="head_dims")
    assert small.num_heads == 4 and small.head_dim == 2 and small.q.out_features == 8


@pytest.mark.parametrize("tracer", TRACERS)
def test_ellipsis_einsum(tracer):
    model = _seeded(EllipsisEinsum)
    x = torch.randn(2, 3, 5, 8)
    small, _ = slim_exact(model, x, 0.5, tracer=tracer)
    assert small.fc_in.out_features == 8 and small.weight.shape == (6, 8) and small.fc_out.in_features == 6


@pytest.mark.parametrize("tracer", TRACERS)
def test_implicit_output_einsum(tracer):
    model = _seeded(ImplicitEinsum)
    small, _ = slim_exact(model, torch.randn(3, 8), 0.5, tracer=tracer)
    assert small.fc_in.out_features == 8 and small.weight.shape == (8, 6) and small.fc_out.in_features == 6


@pytest.mark.parametrize("tracer", TRACERS)
def test_diagonal_einsum_drops_rows_and_columns_together(tracer):
    model = _seeded(DiagonalScale)
    small, _ = slim_exact(model, torch.randn(3, 8), 0.5, tracer=tracer)
    kept = _kept(model.fc_in.weight, small.fc_in.weight, 0)
    assert small.diag.shape == (8, 8)
    assert torch.equal(small.diag, model.diag[kept][:, kept])


@pytest.mark.parametrize("tracer", TRACERS)
def test_trace_couples_the_two_sides(tracer):
    model = _seeded(TraceOfOuter)
    small, _ = slim_exact(model, torch.randn(3, 8), 0.5, tracer=tracer)
    assert small.a.out_features == small.b.out_features == 8
    assert _kept(model.a.weight, small.a.weight, 0) == _kept(model.b.weight, small.b.weight, 0)


@pytest.mark.parametrize("tracer", TRACERS)
def test_three_operand_einsum(tracer):
    model = _seeded(ThreeOperands)
    small, _ = slim_exact(model, torch.randn(3, 8), 0.5, tracer=tracer)
    assert small.fc_in.out_features == 8 and small.u.shape == (8, 6) and small.v.shape == (6, 5)
    assert small.fc_out.in_features == 5


@pytest.mark.parametrize("tracer", TRACERS)
def test_conv_feature_map_mixed_by_einsum(tracer):
    model = _seeded(ConvMix)
    small, _ = slim_exact(model, torch.randn(2, 3, 6, 6), 0.5, tracer=tracer)
    assert small.conv1.out_channels == 4 and small.mix.shape == (6, 4) and small.conv2.in_channels == 6


@pytest.mark.parametrize("tracer", TRACERS)
def test_sublist_format(tracer):
    model = _seeded(SublistEinsum)
    small, _ = slim_exact(model, torch.randn(2, 3, 8), 0.5, tracer=tracer)
    assert small.fc_in.out_features == 8 and small.weight.shape == (6, 8) and small.fc_out.in_features == 6


class BroadcastEinsum(nn.Module):
    """Size-1 subscripts broadcast against full ones: the batch subscript of a (1, hidden) gain, and
    the channel subscript of a one-channel linear's output spread over all of fc_g's channels."""

    def __init__(self, d=8, hidden=16, out=4):
        super().__init__()
        self.fc_one, self.fc_g, self.fc_out = nn.Linear(d, 1), nn.Linear(d, hidden), nn.Linear(hidden, out)
        self.gain = nn.Parameter(torch.randn(1, hidden))

    def forward(self, x):
        g = torch.relu(self.fc_g(x))
        y = torch.einsum("bi,bi->bi", torch.einsum("bi,bi->bi", self.fc_one(x), g), self.gain)
        return self.fc_out(y)


@pytest.mark.parametrize("tracer", TRACERS)
def test_broadcast_subscript(tracer):
    model = _seeded(BroadcastEinsum)
    x = torch.randn(3, 8)
    small, _ = slim_exact(model, x, 0.5, tracer=tracer)
    assert small.fc_g.out_features == 8 and small.gain.shape == (1, 8) and small.fc_one.out_features == 1
    graph = sp.DependencyGraph(model, x, tracer=tracer)
    one = [g for g in graph.groups if ("fc_one.weight", 0) in g.members]
    if tracer == "fx":  # (torch.export's graph reads the weight itself, and size-1 axes carry no channels)
        assert "broadcast from size 1 to 16" in one[0].frozen_reason  # it can neither widen nor vanish


# ----- what the rule cannot read ----------------------------------------------------------------------------
class RuntimeEquation(nn.Module):
    """The equation arrives as a forward() argument: fx records it as a graph input, not a constant."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 12)
        self.weight = _param(4, 12)

    def forward(self, x, equation: str):
        return torch.einsum(equation, torch.relu(self.fc2(torch.relu(self.fc1(x)))), self.weight)


def test_runtime_equation_is_frozen_and_reported():
    model = _seeded(RuntimeEquation)
    example = (torch.randn(3, 8), "bi,oi->bo")
    graph = sp.DependencyGraph(model, example, tracer="fx")
    frozen = [g for g in graph.groups if ("fc2.weight", 0) in g.members]
    assert len(frozen) == 1 and not frozen[0].prunable
    assert "einsum" in frozen[0].frozen_reason and "run time" in frozen[0].frozen_reason
    assert graph.unknown_ops == {}  # the op has a rule: it froze what it could not read, it did not fail
    small, _ = slim_exact(model, example, 0.5, tracer="fx")  # the rest of the model is still pruned
    assert small.fc1.out_features == 8 and small.fc2.out_features == 12 and small.weight.shape == (4, 12)
    assert outputs(small, example).shape == (3, 4)


# ----- property: random linear / bilinear einsums -------------------------------------------------------------
class RandomEinsum(nn.Module):
    """fc_in (and fc_in2) -> einsum(equation, x[, x2], W) -> einsum(features last, mixed by a second
    weight) -> fc_out: the einsum consumes the width of fc_in and produces its own."""

    def __init__(self, case):
        super().__init__()
        self.equation, self.reorder, self.as_list = case["equation"], case["reorder"], case["as_list"]
        self.fc_in = nn.Linear(4, case["sizes"][case["i"]])
        self.fc_in2 = nn.Linear(4, case["sizes"][case["j"]]) if case["bilinear"] else None
        self.weight = _param(*[case["sizes"][letter] for letter in case["weight"]])
        self.mix = _param(5, case["sizes"][case["o"]])
        self.fc_out = nn.Linear(5, 3)

    def forward(self, x):
        operands = [torch.relu(self.fc_in(x))]
        if self.fc_in2 is not None:
            operands.append(torch.relu(self.fc_in2(x)))
        operands.append(self.weight)
        y = torch.einsum(self.equation, operands) if self.as_list else torch.einsum(self.equation, *operands)
        return self.fc_out(torch.relu(torch.einsum(self.reorder, torch.relu(y), self.mix)))


@st.composite
def einsum_cases(draw):
    """A linear (``x W``) or bilinear (``x1 x2 W``) einsum: batch subscripts spelled out or as an
    ellipsis, weight axes in any order, explicit output in any order or implicit, random sizes."""
    bilinear, ellipsis, implicit = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    n_batch = draw(st.integers(1, 3))
    letters = draw(st.permutations(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ")))
    batch, (i, j, o, p) = letters[:n_batch], letters[n_batch:n_batch + 4]
    batch_sizes = [draw(st.integers(1, 3)) for _ in batch]
    sizes = {i: draw(st.integers(2, 6)), j: draw(st.integers(2, 6)), o: draw(st.integers(2, 6))}
    weight = draw(st.permutations([o, i, j] if bilinear else [o, i]))
    prefix = "..." if ellipsis else "".join(batch)
    terms = [prefix + i] + ([prefix + j] if bilinear else []) + ["".join(weight)]
    if implicit:  # the output: ellipsis axes, then the letters that occur once, sorted
        counts = {}
        for letter in "".join(terms).replace("...", ""):
            counts[letter] = counts.get(letter, 0) + 1
        out = ("..." if ellipsis else "") + "".join(sorted(k for k, n in counts.items() if n == 1))
        equation = ",".join(terms)
    else:
        order = draw(st.permutations(["..."] + [o] if ellipsis else batch + [o]))
        out = "".join(order)
        equation = ",".join(terms) + "->" + out
    if draw(st.booleans()):  # spaces are allowed between subscripts (not inside "...")
        equation = " " + equation.replace(",", " , ").replace("->", " -> ") + " "
    reorder = f"{out},{p}{o}->{out.replace(o, '')}{p}"
    return dict(equation=equation, reorder=reorder, bilinear=bilinear, sizes=sizes, weight=weight, i=i, j=j, o=o,
                batch_sizes=batch_sizes, as_list=draw(st.booleans()), tracer=draw(st.sampled_from(TRACERS)))


@settings(max_examples=30, deadline=None)
@given(case=einsum_cases())
def test_random_einsum_linears_verify(case):
    torch.manual_seed(0)
    model = RandomEinsum(case).eval()
    x = torch.randn(*case["batch_sizes"], 4)
    small, report = sp.slim_with_report(model, x, 0.5, tracer=case["tracer"])  # raises unless verified
    assert report.verification.passed and report.verification.exact, (case["equation"], report.verification.message)
    assert report.params_after < report.params_before, case["equation"]
    assert small.fc_in.out_features < case["sizes"][case["i"]], case["equation"]  # the contracted width
    assert outputs(small, x).shape == outputs(model, x).shape
