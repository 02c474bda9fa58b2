"""Random-architecture generator for structprune's property tests.

``arch_specs()`` is a hypothesis strategy producing an :class:`ArchSpec`: pure data (a nested
dict of plain python values plus a torch seed) describing a small conv net. ``spec.build()``
turns it into ``(model, example_input)``; the model is plain PyTorch, in ``eval()`` mode, and
traceable by ``torch.fx.symbolic_trace`` (forward only branches on python constants fixed at
construction time; the top level iterates over a fixed ``nn.ModuleList`` of blocks).

Because the strategy draws data (not modules), hypothesis can shrink a failing architecture,
and the falsifying example it prints is itself a repro::

    from tests.archgen import ArchSpec
    model, x = ArchSpec(spec={...}, seed=0).build()

Op set (2-D and 1-D variants): Conv (k 1/3, same padding), grouped conv, depthwise conv (with
and without channel multiplier 2), ConvTranspose (stride 1, and stride-2 upsampling), BatchNorm,
GroupNorm, InstanceNorm(affine), LayerNorm or RMSNorm in a channels-last token MLP, ReLU/GELU/SiLU/
Hardswish/PReLU (single and per-channel), Dropout, Identity, residual add (identity or 1x1
projection), squeeze-excite gate, concat of two branches, chunk into halves (cat or add),
max/avg pooling, nearest interpolate x2, layer-scale parameters, a conv called twice (shared
weights). Heads: global pool -> Linear, mean -> Linear, adaptive pool k -> flatten -> Linear,
fixed pool/none -> flatten -> Linear (fixed spatial size), optionally with a second output
(tuple or dict).
"""
from __future__ import annotations

import dataclasses
import pprint
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

MAX_C = 24
MIN_C = 2
ACTS = ("relu", "gelu", "silu", "hardswish", "prelu1", "prelu_c")
STAT_NORMS = ("gn", "in", "ln")  # ops whose statistics run across channels


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
def _cls(dim: int) -> dict[str, Any]:
    if dim == 2:
        return dict(conv=nn.Conv2d, convT=nn.ConvTranspose2d, bn=nn.BatchNorm2d,
                    inorm=nn.InstanceNorm2d, maxpool=nn.MaxPool2d, avgpool=nn.AvgPool2d,
                    apool=nn.AdaptiveAvgPool2d)
    return dict(conv=nn.Conv1d, convT=nn.ConvTranspose1d, bn=nn.BatchNorm1d,
                inorm=nn.InstanceNorm1d, maxpool=nn.MaxPool1d, avgpool=nn.AvgPool1d,
                apool=nn.AdaptiveAvgPool1d)


def _act(kind: str, c: int) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "gelu":
        return nn.GELU()
    if kind == "silu":
        return nn.SiLU()
    if kind == "hardswish":
        return nn.Hardswish()
    if kind == "prelu1":
        return nn.PReLU(num_parameters=1)
    if kind == "prelu_c":
        return nn.PReLU(num_parameters=c)
    raise ValueError(kind)


class LayerScale(nn.Module):
    """Learnable per-channel scale used directly in forward."""

    def __init__(self, c: int, style: str, dim: int):
        super().__init__()
        self.style = style
        self.bshape = (1, -1) + (1,) * dim
        if style == "view":
            self.gamma = nn.Parameter(torch.ones(c))
        else:  # "param": a (1, C, 1, 1)-shaped parameter
            self.gamma = nn.Parameter(torch.ones((1, c) + (1,) * dim))

    def forward(self, x):
        if self.style == "view":
            return x * self.gamma.view(self.bshape)
        return x * self.gamma


class SharedTwice(nn.Module):
    """The same conv (in == out channels) applied twice in sequence."""

    def __init__(self, conv: nn.Module, act: nn.Module | None):
        super().__init__()
        self.conv = conv
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.conv(self.act(self.conv(x)))


class SeqBlock(nn.Module):
    def __init__(self, body: nn.Sequential, res: str, proj: nn.Module | None):
        super().__init__()
        self.res = res
        self.body = body
        if proj is not None:
            self.proj = proj

    def forward(self, x):
        y = self.body(x)
        if self.res == "id":
            y = y + x
        elif self.res == "proj":
            y = y + self.proj(x)
        return y


class SEBlock(nn.Module):
    def __init__(self, c: int, r: int, act: str, dim: int):
        super().__init__()
        k = _cls(dim)
        self.pool = k["apool"](1)
        self.reduce = k["conv"](c, r, 1)
        self.act = _act(act, r)
        self.expand = k["conv"](r, c, 1)

    def forward(self, x):
        g = torch.sigmoid(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * g


class ConcatBlock(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class ChunkBlock(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, merge: str, style: str):
        super().__init__()
        self.a = a
        self.b = b
        self.merge = merge
        self.style = style

    def forward(self, x):
        if self.style == "method":
            parts = x.chunk(2, dim=1)
        else:
            parts = torch.chunk(x, 2, dim=1)
        ya = self.a(parts[0])
        yb = self.b(parts[1])
        if self.merge == "add":
            return ya + yb
        return torch.cat((ya, yb), dim=1)


class InterpBlock(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class TokenBlock(nn.Module):
    """Channels-last token MLP: permute -> LayerNorm(C) or RMSNorm(C) -> Linear -> act -> Linear -> permute."""

    def __init__(self, c: int, hidden: int, out: int, act: str, res: bool, dim: int, norm: str = "ln"):
        super().__init__()
        self.dim = dim
        self.res = res
        self.norm = nn.LayerNorm(c) if norm == "ln" else nn.RMSNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.act = _act(act, hidden)  # never PReLU: it would act on the wrong axis
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        if self.dim == 2:
            t = x.permute(0, 2, 3, 1)
        else:
            t = x.transpose(1, 2)
        t = self.fc2(self.act(self.fc1(self.norm(t))))
        if self.dim == 2:
            y = t.permute(0, 3, 1, 2)
        else:
            y = t.transpose(1, 2)
        if self.res:
            y = y + x
        return y


class Head(nn.Module):
    def __init__(self, c: int, s: int, hs: dict, dim: int):
        super().__init__()
        k = _cls(dim)
        self.dim = dim
        self.pre = hs["pre"]
        self.flat = hs.get("flat", "torch")
        if self.flat == "module":
            self.flatten = nn.Flatten(1)
        self.outputs = hs["outputs"]
        self.aux = hs["aux"]
        if self.pre == "gap":
            self.pool = k["apool"](1)
            feat = c
        elif self.pre == "mean":
            feat = c
        elif self.pre == "adaptive":
            self.pool = k["apool"](hs["k"])
            feat = c * hs["k"] ** dim
        elif self.pre == "fixed":
            self.pool = k["avgpool"](hs["f"])
            feat = c * (s // hs["f"]) ** dim
        else:  # "none": flatten the (small) map directly
            feat = c * s ** dim
        self.fc = nn.Linear(feat, hs["classes"])

    def _flatten(self, t):
        if self.flat == "module":
            return self.flatten(t)
        if self.flat == "method":
            return t.flatten(1)
        if self.flat == "reshape":
            return t.reshape(t.size(0), -1)
        return torch.flatten(t, 1)

    def forward(self, x):
        if self.pre == "mean":
            z = x.mean(dim=(2, 3)) if self.dim == 2 else x.mean(dim=2)
        elif self.pre == "none":
            z = self._flatten(x)
        else:
            z = self._flatten(self.pool(x))
        logits = self.fc(z)
        if self.outputs == "single":
            return logits
        aux = x if self.aux == "feat" else z
        if self.outputs == "tuple":
            return logits, aux
        return {"logits": logits, "aux": aux}


class GenNet(nn.Module):
    """A generated network: stem conv, a fixed list of blocks, a head."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        dim = spec["dim"]
        k = _cls(dim)
        c = spec["in_ch"]
        s = spec["size"]
        st_ = spec["stem"]
        self.stem = k["conv"](c, st_["out"], st_["k"], padding=st_["k"] // 2)
        c = st_["out"]
        blocks = []
        for b in spec["blocks"]:
            mod, c, s = _build_block(b, c, s, dim)
            blocks.append(mod)
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(c, s, spec["head"], dim)

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def _build_op(op: dict, c: int, dim: int) -> tuple[nn.Module, int]:
    k = _cls(dim)
    kind = op["op"]
    if kind == "conv":
        m = k["conv"](c, op["out"], op["k"], padding=op["k"] // 2, groups=op["groups"],
                      bias=op["bias"])
        return m, op["out"]
    if kind == "convT":
        m = k["convT"](c, op["out"], op["k"], padding=op["k"] // 2, groups=op.get("groups", 1),
                       bias=op["bias"])
        return m, op["out"]
    if kind == "shared":
        conv = k["conv"](c, c, op["k"], padding=op["k"] // 2, groups=op.get("groups", 1))
        return SharedTwice(conv, _act(op["act"], c) if op["act"] else None), c
    if kind == "bn":
        return k["bn"](c), c
    if kind == "gn":
        return nn.GroupNorm(op["groups"], c), c
    if kind == "in":
        return k["inorm"](c, affine=True), c
    if kind == "act":
        return _act(op["kind"], c), c
    if kind == "dropout":
        return nn.Dropout(op["p"]), c
    if kind == "identity":
        return nn.Identity(), c
    if kind == "scale":
        return LayerScale(c, op["style"], dim), c
    raise ValueError(kind)


def _build_ops(ops: list, c: int, dim: int) -> tuple[nn.Sequential, int]:
    mods = []
    for op in ops:
        m, c = _build_op(op, c, dim)
        mods.append(m)
    return nn.Sequential(*mods), c


def _build_block(b: dict, c: int, s: int, dim: int) -> tuple[nn.Module, int, int]:
    k = _cls(dim)
    kind = b["kind"]
    if kind == "seq":
        body, co = _build_ops(b["ops"], c, dim)
        proj = k["conv"](c, co, 1, bias=False) if b["res"] == "proj" else None
        return SeqBlock(body, b["res"], proj), co, s
    if kind == "se":
        return SEBlock(c, b["r"], b["act"], dim), c, s
    if kind == "concat":
        a, ca = _build_ops(b["a"], c, dim)
        bb, cb = _build_ops(b["b"], c, dim)
        return ConcatBlock(a, bb), ca + cb, s
    if kind == "chunk":
        h = c // 2
        a, ca = _build_ops(b["a"], h, dim)
        bb, cb = _build_ops(b["b"], h, dim)
        co = ca if b["merge"] == "add" else ca + cb
        return ChunkBlock(a, bb, b["merge"], b["style"]), co, s
    if kind == "pool":
        cls = k["maxpool"] if b["type"] == "max" else k["avgpool"]
        return cls(2), c, s // 2
    if kind == "interp":
        return InterpBlock(), c, s * 2
    if kind == "up":
        return k["convT"](c, b["out"], 2, stride=2), b["out"], s * 2
    if kind == "tokens":
        return TokenBlock(c, b["hidden"], b["out"], b["act"], b["res"], dim, b.get("norm", "ln")), b["out"], s
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------
# the spec object
# ----------------------------------------------------------------------------------------------
def _randomize(model: nn.Module) -> None:
    """Give norms, scales and PReLUs non-trivial values (BN in eval is then not an identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                m.running_var.copy_(torch.rand_like(m.running_var) * 1.5 + 0.5)
            if isinstance(m, nn.RMSNorm):
                m.weight.copy_(torch.rand_like(m.weight) * 1.0 + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                              nn.modules.instancenorm._InstanceNorm)):
                if m.weight is not None:
                    m.weight.copy_(torch.rand_like(m.weight) * 1.0 + 0.5)
                    m.bias.copy_(torch.randn_like(m.bias) * 0.2)
            if isinstance(m, LayerScale):
                m.gamma.copy_(torch.rand_like(m.gamma) * 1.5 + 0.1)
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand_like(m.weight) * 0.5)


def _walk_ops(spec: dict):
    for b in spec["blocks"]:
        for key in ("ops", "a", "b"):
            if key in b and isinstance(b[key], list):
                yield from b[key]


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    spec: dict
    seed: int

    # -- construction ------------------------------------------------------------------------
    def build(self) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(self.seed)
        model = GenNet(self.spec)
        _randomize(model)
        model.eval()
        x = self.make_input()
        return model, x

    def make_input(self, batch: int | None = None, size: int | None = None,
                   seed: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1 if seed is None else seed)
        b = self.spec["batch"] if batch is None else batch
        s = self.spec["size"] if size is None else size
        shape = (b, self.spec["in_ch"]) + (s,) * self.spec["dim"]
        return torch.randn(shape, generator=g)

    # -- facts the tests need ----------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.spec["dim"]

    @property
    def has_stat_norm(self) -> bool:
        """GroupNorm / InstanceNorm / LayerNorm anywhere (channel statistics => inexact)."""
        for op in _walk_ops(self.spec):
            if op["op"] in ("gn", "in"):
                return True
        return any(b["kind"] == "tokens" for b in self.spec["blocks"])

    @property
    def spatial_flexible(self) -> bool:
        """False when the head flattens a fixed-size map into a Linear."""
        return self.spec["head"]["pre"] in ("gap", "mean", "adaptive")

    @property
    def min_size(self) -> int:
        """Smallest input size the architecture accepts (pools need >= 2 and IN > 1 element)."""
        n_pool = sum(1 for b in self.spec["blocks"] if b["kind"] == "pool")
        return 2 ** (n_pool + 1)

    def describe(self) -> str:
        return pprint.pformat(self.spec, width=100, sort_dicts=False)


# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_OP_KINDS = ("conv", "conv", "conv", "gconv", "dw", "convT", "shared", "bn", "bn", "gn", "in",
             "act", "act", "dropout", "identity", "scale")


@st.composite
def _op(draw, c: int, preserve: bool, no_stat: bool = False) -> tuple[dict, int]:
    """One channel op applied to ``c`` channels; ``preserve`` forces out == in."""
    kinds = [k for k in _OP_KINDS if not (no_stat and k in STAT_NORMS)]
    g_opts = [d for d in _divisors(c) if 1 < d < c]
    if not g_opts:
        kinds.remove("gconv")
    kind = draw(st.sampled_from(kinds))
    chan = st.integers(MIN_C, MAX_C)
    if kind == "conv":
        out = c if preserve else draw(chan)
        return dict(op="conv", out=out, k=draw(st.sampled_from([1, 3])), groups=1,
                    bias=draw(st.booleans())), out
    if kind == "gconv":
        g = draw(st.sampled_from(g_opts))
        out = c if preserve else g * draw(st.integers(1, max(1, MAX_C // g)))
        return dict(op="conv", out=out, k=draw(st.sampled_from([1, 3])), groups=g,
                    bias=draw(st.booleans())), out
    if kind == "dw":
        mult = 1 if preserve or 2 * c > 32 else draw(st.sampled_from([1, 2]))
        return dict(op="conv", out=c * mult, k=draw(st.sampled_from([1, 3])), groups=c,
                    bias=draw(st.booleans())), c * mult
    if kind == "convT":
        g = draw(st.sampled_from([1, 1] + g_opts))
        out = c if preserve else g * draw(st.integers(max(1, MIN_C // g), max(1, MAX_C // g)))
        return dict(op="convT", out=out, k=draw(st.sampled_from([1, 3])), groups=g,
                    bias=draw(st.booleans())), out
    if kind == "shared":
        act = draw(st.sampled_from([None] + list(ACTS)))
        g = draw(st.sampled_from([1, 1, c] + g_opts))
        return dict(op="shared", k=draw(st.sampled_from([1, 3])), act=act, groups=g), c
    if kind == "gn":
        return dict(op="gn", groups=draw(st.sampled_from(_divisors(c)))), c
    if kind == "act":
        return dict(op="act", kind=draw(st.sampled_from(ACTS))), c
    if kind == "dropout":
        return dict(op="dropout", p=draw(st.sampled_from([0.1, 0.5]))), c
    if kind == "scale":
        return dict(op="scale", style=draw(st.sampled_from(["view", "param"]))), c
    return dict(op=kind), c  # bn, in, identity


@st.composite
def _ops(draw, c: int, min_ops: int, max_ops: int, preserve: bool = False,
         no_stat: bool = False) -> tuple[list, int]:
    n = draw(st.integers(min_ops, max_ops))
    ops = []
    for _ in range(n):
        op, c = draw(_op(c, preserve, no_stat))
        ops.append(op)
    return ops, c


@st.composite
def _block(draw, c: int, s: int, dim: int, no_stat: bool = False) -> tuple[dict, int, int]:
    kinds = ["seq", "seq", "seq", "se", "concat"] + ([] if no_stat else ["tokens"])
    if c % 2 == 0 and c >= 4:
        kinds.append("chunk")
    if s >= 4:
        kinds.append("pool")
    if s <= 12:
        kinds += ["interp", "up"]
    kind = draw(st.sampled_from(kinds))
    if kind == "seq":
        ops, co = draw(_ops(c, 1, 4, no_stat=no_stat))
        if co == c:
            res = draw(st.sampled_from(["none", "id", "proj"]))
        else:
            res = draw(st.sampled_from(["none", "proj"]))
        return dict(kind="seq", ops=ops, res=res), co, s
    if kind == "se":
        return dict(kind="se", r=draw(st.integers(1, max(1, c // 2))),
                    act=draw(st.sampled_from(ACTS))), c, s
    if kind == "concat":
        a, ca = draw(_ops(c, 0, 2, no_stat=no_stat))
        b, cb = draw(_ops(c, 1, 2, no_stat=no_stat))
        if ca + cb > 2 * MAX_C:  # keep things small: squeeze both branches
            squeeze = dict(op="conv", out=MIN_C, k=1, groups=1, bias=True)
            a, ca = a + [squeeze], MIN_C
            b, cb = b + [dict(squeeze)], MIN_C
        return dict(kind="concat", a=a, b=b), ca + cb, s
    if kind == "chunk":
        h = c // 2
        merge = draw(st.sampled_from(["cat", "add"]))
        a, ca = draw(_ops(h, 0, 2, preserve=merge == "add", no_stat=no_stat))
        b, cb = draw(_ops(h, 0, 2, preserve=merge == "add", no_stat=no_stat))
        co = ca if merge == "add" else ca + cb
        return dict(kind="chunk", a=a, b=b, merge=merge,
                    style=draw(st.sampled_from(["function", "method"]))), co, s
    if kind == "pool":
        return dict(kind="pool", type=draw(st.sampled_from(["max", "avg"]))), c, s // 2
    if kind == "interp":
        return dict(kind="interp"), c, s * 2
    if kind == "up":
        out = draw(st.integers(MIN_C, MAX_C))
        return dict(kind="up", out=out), out, s * 2
    # tokens
    res = draw(st.booleans())
    out = c if res else draw(st.integers(MIN_C, MAX_C))
    return dict(kind="tokens", hidden=draw(st.integers(MIN_C, 2 * MAX_C)), out=out,
                act=draw(st.sampled_from(ACTS[:4])), res=res, norm=draw(st.sampled_from(["ln", "rms"]))), out, s


@st.composite
def _head(draw, s: int) -> dict:
    pres = ["gap", "gap", "mean", "adaptive", "fixed"]
    if s <= 8:
        pres.append("none")
    pre = draw(st.sampled_from(pres))
    hs: dict[str, Any] = dict(pre=pre)
    if pre == "adaptive":
        hs["k"] = draw(st.integers(1, min(3, s)))
    if pre == "fixed":
        # a fixed pooling that leaves a small (1..4 wide) map to flatten
        opts = [f for f in range(1, s + 1) if 1 <= s // f <= 4]
        hs["f"] = draw(st.sampled_from(opts))
    if pre != "mean":
        hs["flat"] = draw(st.sampled_from(["torch", "torch", "method", "reshape", "module"]))
    hs["classes"] = draw(st.integers(2, 10))
    hs["outputs"] = draw(st.sampled_from(["single", "single", "tuple", "dict"]))
    hs["aux"] = draw(st.sampled_from(["feat", "vec"]))
    return hs


@st.composite
def arch_specs(draw, dims: tuple[int, ...] = (2, 2, 2, 1), max_blocks: int = 5,
               exclude_stat_norms: bool = False) -> ArchSpec:
    """Strategy for :class:`ArchSpec`. ``dims`` is sampled (duplicates weight it)."""
    dim = draw(st.sampled_from(dims))
    in_ch = draw(st.integers(1, 4))
    size = draw(st.integers(8, 16))
    batch = draw(st.integers(1, 3))
    stem = dict(out=draw(st.integers(MIN_C, MAX_C)), k=draw(st.sampled_from([1, 3])))
    c, s = stem["out"], size
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        b, c, s = draw(_block(c, s, dim, exclude_stat_norms))
        blocks.append(b)
    head = draw(_head(s))
    spec = dict(dim=dim, in_ch=in_ch, size=size, batch=batch, stem=stem, blocks=blocks,
                head=head)
    seed = draw(st.integers(0, 2**16))
    return ArchSpec(spec=spec, seed=seed)
