"""sp.load against hostile and damaged files: every variant raises LoadError and changes nothing the
caller owns (the target instance, the config a factory shares with the caller's own model); the
happy path stays bit-exact, configs are never shared with the caller, files get the usual mode.

Issue 16, items 1-3 and 11 (file mode). Small models only: the whole file runs in seconds.
"""
from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

import structprune as sp
from structprune.tools.io import BUFFERS_FILE, PLAN_FILE, WEIGHTS_FILE, file_digest, plan_digest

# random tiny models pruned by weights alone: the advice to calibrate on data does not apply here
pytestmark = [pytest.mark.filterwarnings("ignore:.*weights alone.*"), pytest.mark.filterwarnings("ignore:.*token_id.*")]


# ---- models ----------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv/bn/maxpool/conv/bn/linear: strides, paddings, eps and a padding mode to tamper with."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, padding_mode="zeros")
        self.bn2 = nn.BatchNorm2d(2 * width, eps=1e-3)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))


def llama_config(**changes) -> transformers.LlamaConfig:
    options = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaConfig(**{**options, **changes})


def _trained_bn(model: nn.Module) -> nn.Module:
    """Running statistics that are not the init values, so a mix-up of buffers shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory):
    torch.manual_seed(0)
    small = sp.slim(_trained_bn(SmallCNN()), X, 0.5)
    directory = tmp_path_factory.mktemp("cnn")
    sp.save(small, directory)
    return small, directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A LLaMA pruned in head dims (its rotary inv_freq is sliced: buffers.safetensors is written)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    small = sp.slim(model, (IDS,), 0.5, attention="head_dims", hidden=False)
    directory = tmp_path_factory.mktemp("llama")
    sp.save(small, directory)
    return small, directory


# ---- what must not change --------------------------------------------------------------------------------
def _plain_attributes(model: nn.Module) -> dict:
    return {path: {k: copy.deepcopy(v) for k, v in vars(m).items()
                   if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))}
            for path, m in model.named_modules()}


def _tensors(model: nn.Module) -> dict:
    """Every parameter and buffer, under every name, with its identity and a copy of its values."""
    found = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for kind in (m._parameters, m._buffers):
            for name, t in kind.items():
                if t is not None:
                    found[f"{path}.{name}"] = (t, t.detach().clone())
    return found


class Snapshot:
    """Tensors (identity and values), plain attributes and config objects (identity and to_dict)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors = _tensors(model)
        self.attributes = _plain_attributes(model)
        self.configs = {path: (m.config, m.config.to_dict()) for path, m in model.named_modules()
                        if isinstance(getattr(m, "config", None), transformers.PretrainedConfig)}

    def assert_unchanged(self) -> None:
        now = _tensors(self.model)
        assert now.keys() == self.tensors.keys()
        for name, (tensor, values) in self.tensors.items():
            assert now[name][0] is tensor, f"{name} was replaced"
            assert tensor.shape == values.shape and torch.equal(tensor.detach(), values), f"{name} changed"
        assert _plain_attributes(self.model) == self.attributes
        for path, (config, fields) in self.configs.items():
            module = self.model.get_submodule(path)
            assert module.config is config and config.to_dict() == fields, f"{path}.config changed"


# ---- ways to damage a saved directory --------------------------------------------------------------------
def _copy(directory, tmp_path):
    for name in os.listdir(directory):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    return tmp_path


def _plan(d) -> dict:
    return json.loads((d / PLAN_FILE).read_text())


def _write_plan(d, plan: dict, sign: bool = True) -> None:
    if sign:
        plan["sha256"] = plan_digest(plan)
    (d / PLAN_FILE).write_text(json.dumps(plan))


def edit(change, sign=True):
    """Edit the plan; ``sign``: store the new content hash too, as a deliberate editor would, so that
    the checks behind the hash are reached."""
    def damage(d):
        plan = _plan(d)
        change(plan)
        _write_plan(d, plan, sign)
    return damage


def attribute(path, name, value):
    return edit(lambda p: p["attributes"][path].__setitem__(name, value))


def resign(d) -> None:
    """Record the files' current hashes in the plan and sign it: only the checks behind the hashes remain."""
    plan = _plan(d)
    for name in plan["files"]:
        digest, size = file_digest(d / name)
        plan["files"][name] = {"sha256": digest, "size": size}
    _write_plan(d, plan)


def rewrite(name, change, sign=False):
    def damage(d):
        (d / name).write_bytes(change(bytearray((d / name).read_bytes())))
        if sign:
            resign(d)
    return damage


def truncate(name, keep=0.5):
    return rewrite(name, lambda b: bytes(b[:int(len(b) * keep)]))


def flip_data(name, count=64):
    """Flip ``count`` bytes in the middle of the tensor data (after the header)."""
    def change(b):
        start = 8 + int.from_bytes(b[:8], "little")
        middle = start + (len(b) - start) // 2
        for i in range(middle, min(middle + count, len(b))):
            b[i] ^= 0xFF
        return bytes(b)
    return rewrite(name, change)


def flip_header(name, sign=False):
    """Damage the safetensors JSON header (its first brace), with or without updating the plan's hashes."""
    def change(b):
        b[8] ^= 0x55
        return bytes(b)
    return rewrite(name, change, sign)


def replace_weights(tensors):
    """Write another safetensors file in place of model.safetensors and re-sign: the plan and the file
    then disagree on names, shapes or dtypes."""
    def damage(d):
        save_file(tensors(d), str(d / WEIGHTS_FILE))
        resign(d)
    return damage


def _saved(d):
    from safetensors.torch import load_file

    return load_file(str(d / WEIGHTS_FILE))


def remove(name):
    return lambda d: (d / name).unlink()


def write_text(name, text):
    return lambda d: (d / name).write_text(text)


def write_bytes(name, data):
    return lambda d: (d / name).write_bytes(data)


def nothing(d):
    return None


# ---- the variants ----------------------------------------------------------------------------------------
# (id, damage, message the LoadError must contain, factory for the target: None means the fresh
# SmallCNN *instance* is the target)
CNN_VARIANTS = [
    # truncation and missing files
    ("weights truncated to half", truncate(WEIGHTS_FILE), "truncated"),
    ("weights truncated to nothing", truncate(WEIGHTS_FILE, 0), "truncated"),
    ("weights one byte short", rewrite(WEIGHTS_FILE, lambda b: bytes(b[:-1])), "truncated"),
    ("weights one byte longer", rewrite(WEIGHTS_FILE, lambda b: bytes(b) + b"\0"), "truncated"),
    ("plan truncated", truncate(PLAN_FILE), "not valid JSON"),
    ("weights missing", remove(WEIGHTS_FILE), "not a saved structprune model"),
    ("plan missing", remove(PLAN_FILE), "not a saved structprune model"),
    # bit flips
    ("64 bytes flipped in the weights data", flip_data(WEIGHTS_FILE), "content hash"),
    ("one bit flipped in the last byte", rewrite(WEIGHTS_FILE, lambda b: bytes(b[:-1]) + bytes([b[-1] ^ 1])),
     "content hash"),
    ("weights header flipped", flip_header(WEIGHTS_FILE), "content hash"),
    ("weights header flipped, hashes updated", flip_header(WEIGHTS_FILE, sign=True), "not a readable safetensors"),
    ("garbage weights, hashes updated", rewrite(WEIGHTS_FILE, lambda b: b"\x08" + bytes(7) + b"{bad}...", True),
     "not a readable safetensors"),
    # the plan's own integrity
    ("plan edited without its hash", edit(lambda p: p["attributes"]["conv1"].update(stride=[1, 1]), sign=False),
     "content hash"),
    ("plan hash replaced", edit(lambda p: p.update(sha256="0" * 64), sign=False), "content hash"),
    ("plan hash removed", edit(lambda p: p.pop("sha256"), sign=False), "content hash"),
    ("plan hash a number", edit(lambda p: p.update(sha256=12), sign=False), "content hash"),
    ("weights hash in the plan edited", edit(lambda p: p["files"][WEIGHTS_FILE].update(sha256="ab" * 32)),
     "content hash"),
    ("weights size in the plan edited", edit(lambda p: p["files"][WEIGHTS_FILE].update(size=10)), "truncated"),
    # JSON that is not a plan, type confusion
    ("plan is a JSON list", write_text(PLAN_FILE, "[1, 2]"), "not a structprune plan"),
    ("plan is a JSON string", write_text(PLAN_FILE, '"structprune"'), "not a structprune plan"),
    ("plan is not UTF-8", write_bytes(PLAN_FILE, b'{"format": "\xff\xfe"}'), "not valid JSON"),
    ("plan nested 100000 deep", write_text(PLAN_FILE, "[" * 100000), "not valid JSON"),
    ("plan with a duplicate key", rewrite(PLAN_FILE, lambda b: bytes(b).replace(b"{", b'{"format": "x", ', 1)),
     "appears twice"),
    ("wrong format", edit(lambda p: p.update(format="pickle")), "not a structprune plan"),
    ("version 1 (no hashes)", edit(lambda p: p.update(version=1)), "carry no content hashes"),
    ("version 99", edit(lambda p: p.update(version=99)), "version"),
    ("version as a string", edit(lambda p: p.update(version="2")), "version"),
    ("tensors a list", edit(lambda p: p.update(tensors=[])), "'tensors' must be a JSON object"),
    ("tensors missing", edit(lambda p: p.pop("tensors")), "'tensors' entry is missing"),
    ("attributes a string", edit(lambda p: p.update(attributes="conv1")), "'attributes' must be a JSON object"),
    ("a module's attributes a list", edit(lambda p: p["attributes"].update(conv1=[1, 2])), "must be a JSON object"),
    ("config a list", edit(lambda p: p.update(config=[1])), "'config' must be a JSON object"),
    ("files a list", edit(lambda p: p.update(files=[WEIGHTS_FILE])), "'files' must be a JSON object"),
    ("a tensor entry a list", edit(lambda p: p["tensors"].update({"fc.bias": [10]})), "must be an object"),
    ("a shape a string", edit(lambda p: p["tensors"]["fc.bias"].update(shape="10")), "invalid shape"),
    ("a shape with a bool", edit(lambda p: p["tensors"]["fc.bias"].update(shape=[True])), "invalid shape"),
    ("a negative shape", edit(lambda p: p["tensors"]["fc.bias"].update(shape=[-1])), "invalid shape"),
    ("a float shape", edit(lambda p: p["tensors"]["fc.bias"].update(shape=[10.0])), "invalid shape"),
    ("a dtype naming a function", edit(lambda p: p["tensors"]["fc.bias"].update(dtype="load")), "invalid dtype"),
    ("a dtype that is a number", edit(lambda p: p["tensors"]["fc.bias"].update(dtype=32)), "invalid dtype"),
    ("an integer dtype for a float weight", edit(lambda p: p["tensors"]["fc.bias"].update(dtype="int64")),
     "cannot hold"),
    ("model_class a number", edit(lambda p: p.update(model_class=3)), "model_class"),
    ("a file outside the directory", edit(lambda p: p["files"].update({"../../etc/passwd": {"sha256": "", "size": 1}})),
     "lists the files"),
    ("a file entry a string", edit(lambda p: p["files"].update({WEIGHTS_FILE: "abc"})), "must be an object"),
    # shapes
    ("a huge shape", edit(lambda p: p["tensors"]["fc.bias"].update(shape=[10 ** 12])), "cannot come from pruning"),
    ("a huge shape in every dim", edit(lambda p: p["tensors"]["conv1.weight"].update(shape=[10 ** 6] * 4)),
     "cannot come from pruning"),
    ("an extra dim", edit(lambda p: p["tensors"]["fc.bias"].update(shape=[10, 1])), "cannot come from pruning"),
    ("a tensor dropped from the plan", edit(lambda p: p["tensors"].pop("fc.bias")), "does not match this model"),
    ("an unknown tensor in the plan", edit(lambda p: p["tensors"].update(evil={"shape": [1], "dtype": "float32"})),
     "does not match this model"),
    ("plan and file shapes disagree", edit(lambda p: p["tensors"]["conv1.bias"].update(shape=[3])),
     "in the file"),
    ("plan contradicts its own attributes", edit(lambda p: p["tensors"]["conv1.weight"]["shape"].__setitem__(0, 3)),
     "conv1.out_channels is 8 in the plan, but the saved tensor shapes make it 3"),
    ("file from the unpruned model", replace_weights(lambda d: SmallCNN().state_dict()), "in the file"),
    ("file with an extra tensor", replace_weights(lambda d: {**_saved(d), "evil": torch.zeros(3)}),
     "does not list"),
    ("file lacking a tensor", replace_weights(lambda d: {k: v for k, v in _saved(d).items() if k != "fc.bias"}),
     "lacks the tensor"),
    ("file with another dtype", replace_weights(lambda d: {k: v.double() for k, v in _saved(d).items()}),
     "in the file"),
    # attributes: only sizes may shrink, and they must agree with the tensors
    ("conv stride", attribute("conv1", "stride", [1, 1]), "conv1.stride"),
    ("conv stride a string", attribute("conv1", "stride", "abc"), "conv1.stride"),
    ("conv stride a bool", attribute("conv1", "stride", [True, True]), "conv1.stride"),
    ("conv padding", attribute("conv1", "padding", [0, 0]), "conv1.padding"),
    ("conv dilation", attribute("conv2", "dilation", [2, 2]), "conv2.dilation"),
    ("conv kernel_size 0", attribute("conv1", "kernel_size", [0, 0]), "conv1.kernel_size"),
    ("conv padding_mode", attribute("conv2", "padding_mode", "reflect"), "conv2.padding_mode"),
    ("bn eps", attribute("bn1", "eps", 0.1), "bn1.eps"),
    ("bn eps a string", attribute("bn2", "eps", "0.001"), "bn2.eps"),
    ("bn momentum", attribute("bn1", "momentum", 0.5), "bn1.momentum"),
    ("bn affine flag", attribute("bn1", "affine", False), "bn1.affine"),
    ("maxpool kernel_size", attribute("pool", "kernel_size", 2), "pool.kernel_size"),
    ("maxpool stride", attribute("pool", "stride", 1), "pool.stride"),
    ("out_channels contradicts the weight", attribute("conv1", "out_channels", 7), "conv1.out_channels"),
    ("out_channels 0", attribute("conv1", "out_channels", 0), "conv1.out_channels"),
    ("out_channels negative", attribute("conv1", "out_channels", -3), "conv1.out_channels"),
    ("out_channels a bool", attribute("conv1", "out_channels", True), "conv1.out_channels"),
    ("out_channels a float", attribute("conv1", "out_channels", 8.0), "conv1.out_channels"),
    ("out_channels a string", attribute("conv1", "out_channels", "8"), "conv1.out_channels"),
    ("out_channels huge", attribute("conv1", "out_channels", 10 ** 12), "conv1.out_channels"),
    ("in_channels contradicts the weight", attribute("conv2", "in_channels", 5), "conv2.in_channels"),
    ("in_features contradicts the weight", attribute("fc", "in_features", 7), "fc.in_features"),
    ("out_features of an unpruned layer", attribute("fc", "out_features", 5), "fc.out_features"),
    ("num_features contradicts the statistics", attribute("bn1", "num_features", 7), "bn1.num_features"),
    ("an attribute a JSON object", attribute("conv1", "groups", {"a": 1}), "conv1.groups"),
    ("an unknown module", edit(lambda p: p["attributes"].update({"evil": {"x": 1}})), "names module 'evil'"),
]


def _raises_load_error(directory, target, message):
    with pytest.raises(sp.LoadError) as caught:
        sp.load(directory, target)
    assert message in str(caught.value), str(caught.value)


@pytest.mark.parametrize("damage, message", [v[1:] for v in CNN_VARIANTS], ids=[v[0] for v in CNN_VARIANTS])
def test_hostile_cnn_file_into_an_instance(cnn_dir, tmp_path, damage, message):
    _, directory = cnn_dir
    damaged = _copy(directory, tmp_path)
    damage(damaged)
    torch.manual_seed(5)
    fresh = _trained_bn(SmallCNN())
    snapshot = Snapshot(fresh)
    _raises_load_error(damaged, fresh, message)
    snapshot.assert_unchanged()
    assert fresh(X).shape == (2, 10)  # and it still runs


class _Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)


def _needs_an_argument(width):
    return SmallCNN(width)


def _raises():
    raise RuntimeError("out of memory while building")


FACTORY_VARIANTS = [
    ("another class", _Other, "the saved model is a SmallCNN"),
    ("another architecture of the same class", lambda: SmallCNN(4), "cannot come from pruning"),
    ("a torchvision model", lambda: __import__("torchvision").models.resnet18(), "the saved model is a SmallCNN"),
    ("a factory that raises", _raises, "raised RuntimeError: out of memory while building"),
    ("a factory that needs an argument", _needs_an_argument, "no arguments"),
    ("a factory returning a dict", lambda: {"conv1": nn.Conv2d(3, 16, 3)}, "returned a dict, not an nn.Module"),
    ("a factory returning None", lambda: None, "returned a NoneType"),
    ("a factory returning the class", lambda: SmallCNN, "returned a type"),
]


@pytest.mark.parametrize("factory, message", [v[1:] for v in FACTORY_VARIANTS], ids=[v[0] for v in FACTORY_VARIANTS])
def test_wrong_factories_are_refused(cnn_dir, factory, message):
    _, directory = cnn_dir
    _raises_load_error(directory, factory, message)


def test_a_target_that_is_neither_module_nor_function_is_refused(cnn_dir):
    _raises_load_error(cnn_dir[1], 3, "nn.Module or a function")


# LLaMA: the factory builds on the caller's own config object, shared with the caller's model
LLAMA_VARIANTS = [
    ("buffers truncated", truncate(BUFFERS_FILE), "truncated"),
    ("buffers missing", remove(BUFFERS_FILE), "missing"),
    ("buffers bit flip", flip_data(BUFFERS_FILE, 4), "content hash"),
    ("buffers header flipped, hashes updated", flip_header(BUFFERS_FILE, sign=True), "not a readable safetensors"),
    ("weights truncated", truncate(WEIGHTS_FILE, 0.9), "truncated"),
    ("weights bit flip", flip_data(WEIGHTS_FILE), "content hash"),
    ("a huge buffer", edit(lambda p: p["buffers"]["model.rotary_emb.inv_freq"].update(shape=[10 ** 12])),
     "cannot come from pruning"),
    ("a persistent tensor listed as a buffer",
     edit(lambda p: p["buffers"].update({"lm_head.weight": {"shape": [1, 1], "dtype": "float32"}})),
     "non-persistent buffer"),
    ("buffers file dropped from the plan", edit(lambda p: p["files"].pop(BUFFERS_FILE)), "lists the files"),
    ("config size a string", edit(lambda p: p["config"].update(hidden_size="64")), "config.hidden_size"),
    ("config size a bool", edit(lambda p: p["config"].update(num_attention_heads=True)), "config.num_attention_heads"),
    ("config size larger", edit(lambda p: p["config"].update(intermediate_size=10 ** 9)), "config.intermediate_size"),
    ("config size zero", edit(lambda p: p["config"].update(head_dim=0)), "config.head_dim"),
    ("config eps", edit(lambda p: p["config"].update(rms_norm_eps=0.5)), "config.rms_norm_eps"),
    ("config dropout", edit(lambda p: p["config"].update(attention_dropout=0.5)), "config.attention_dropout"),
    ("config max_position_embeddings", edit(lambda p: p["config"].update(max_position_embeddings=32)),
     "config.max_position_embeddings"),
    ("config vocab_size (no size pruning changes)", edit(lambda p: p["config"].update(vocab_size=50)),
     "config.vocab_size"),
    ("config flag", edit(lambda p: p["config"].update(tie_word_embeddings=True)), "config.tie_word_embeddings"),
    ("attention scaling", attribute("model.layers.0.self_attn", "scaling", 1.0), "self_attn.scaling"),
    ("attention head_dim 0", attribute("model.layers.1.self_attn", "head_dim", 0), "self_attn.head_dim"),
    ("attention is_causal", attribute("model.layers.0.self_attn", "is_causal", False), "self_attn.is_causal"),
    ("rotary attention_scaling", attribute("model.rotary_emb", "attention_scaling", 2.0), "attention_scaling"),
    ("q_proj out_features contradicts the weight", attribute("model.layers.0.self_attn.q_proj", "out_features", 16),
     "q_proj.out_features"),
    ("embedding width of an unpruned embedding", attribute("model.embed_tokens", "embedding_dim", 32),
     "embed_tokens.embedding_dim"),
]


@pytest.mark.parametrize("damage, message", [v[1:] for v in LLAMA_VARIANTS], ids=[v[0] for v in LLAMA_VARIANTS])
def test_hostile_llama_file_leaves_the_callers_config_alone(llama_dir, tmp_path, damage, message):
    _, directory = llama_dir
    damaged = _copy(directory, tmp_path)
    damage(damaged)
    cfg = llama_config()
    original = transformers.LlamaForCausalLM(cfg).eval()  # the caller's own model, sharing cfg
    fields = copy.deepcopy(cfg.to_dict())
    snapshot = Snapshot(original)
    _raises_load_error(damaged, lambda: transformers.LlamaForCausalLM(cfg), message)
    assert cfg.to_dict() == fields
    snapshot.assert_unchanged()


@pytest.mark.parametrize("damage, message", [v[1:] for v in LLAMA_VARIANTS[:10]],
                         ids=[v[0] for v in LLAMA_VARIANTS[:10]])
def test_hostile_llama_file_into_an_instance(llama_dir, tmp_path, damage, message):
    """Failures found late (the buffers file is read last) still leave the instance as it was."""
    _, directory = llama_dir
    damaged = _copy(directory, tmp_path)
    damage(damaged)
    torch.manual_seed(3)
    fresh = transformers.LlamaForCausalLM(llama_config()).eval()
    snapshot = Snapshot(fresh)
    _raises_load_error(damaged, fresh, message)
    snapshot.assert_unchanged()


def test_a_failure_after_the_weights_were_read_changes_nothing(llama_dir, tmp_path, monkeypatch):
    """The last step before the swap fails: every new tensor was already built, none went in."""
    from structprune.tools import io

    _, directory = llama_dir
    calls = []
    original = io._read_tensors

    def fail_on_buffers(path, *args):
        calls.append(path)
        if path.endswith(BUFFERS_FILE):
            raise sp.LoadError("simulated failure reading the buffers")
        return original(path, *args)

    monkeypatch.setattr(io, "_read_tensors", fail_on_buffers)
    fresh = transformers.LlamaForCausalLM(llama_config()).eval()
    snapshot = Snapshot(fresh)
    _raises_load_error(directory, fresh, "simulated failure")
    assert len(calls) == 2  # the weights were read first
    snapshot.assert_unchanged()


# ---- the happy path --------------------------------------------------------------------------------------
def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("into", ["instance", "factory"])
def test_cnn_round_trip_is_bit_exact(cnn_dir, into):
    small, directory = cnn_dir
    target = SmallCNN() if into == "instance" else SmallCNN
    back = sp.load(directory, target).eval()
    assert _same_state(small, back) and _plain_attributes(back) == _plain_attributes(small)
    assert torch.equal(back(X), small(X))
    if into == "instance":
        assert back is target


def test_pruned_llama_round_trip_leaves_the_callers_config_alone(tmp_path):
    """Item 1: the factory's model shares the caller's config; load writes pruned sizes into its own copy."""
    torch.manual_seed(0)
    cfg = llama_config()
    llm = transformers.LlamaForCausalLM(cfg).eval()
    fields = copy.deepcopy(cfg.to_dict())
    small = sp.slim(llm, (IDS,), 0.4, scope="global")
    sp.save(small, tmp_path)
    back = sp.load(tmp_path, lambda: transformers.LlamaForCausalLM(cfg)).eval()
    assert cfg.to_dict() == fields and llm.config is cfg and llm.config.hidden_size == 64
    assert back.config is not cfg and back.config.hidden_size == small.config.hidden_size < 64
    # modules that shared one config share its copy
    assert all(m.config is back.config for m in back.modules() if hasattr(m, "config"))
    assert _same_state(small, back)
    assert torch.equal(back(IDS).logits, small(IDS).logits)


def test_pruned_llama_into_an_instance_gets_its_own_config(llama_dir):
    small, directory = llama_dir
    cfg = llama_config()
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    other = transformers.LlamaForCausalLM(cfg)  # a second model of the caller's on the same config
    fields = copy.deepcopy(cfg.to_dict())
    back = sp.load(directory, fresh)
    assert back is fresh and fresh.config is not cfg and other.config is cfg and cfg.to_dict() == fields
    assert torch.equal(back(IDS).logits, small(IDS).logits)


def test_head_dims_pruned_llama_keeps_its_sliced_rotary_buffers(llama_dir):
    small, directory = llama_dir
    assert sorted(os.listdir(directory)) == sorted([BUFFERS_FILE, PLAN_FILE, WEIGHTS_FILE])
    back = sp.load(directory, lambda: transformers.LlamaForCausalLM(llama_config())).eval()
    rotary = back.model.rotary_emb
    assert rotary.inv_freq.shape == small.model.rotary_emb.inv_freq.shape == (2,)
    assert torch.equal(rotary.inv_freq, small.model.rotary_emb.inv_freq)
    assert "inv_freq" not in back.state_dict()  # still non-persistent
    assert torch.equal(back(IDS).logits, small(IDS).logits)


class UpdaterZoo(nn.Module):
    """Layers whose sizes the registry's updaters derive: GroupNorm, a depthwise conv, LayerNorm,
    an LSTM (whose flat weight list must follow its new tensors) and MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.proj = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.lstm = nn.LSTM(32, 24, batch_first=True)
        self.attn = nn.MultiheadAttention(24, 4, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.dw(torch.relu(self.gn(self.conv(x))))
        seq = self.ln(torch.relu(self.proj(x.flatten(2).transpose(1, 2))))
        seq, _ = self.lstm(seq)
        seq, _ = self.attn(seq, seq, seq, need_weights=False)
        return self.head(seq.mean(1))


def test_updater_derived_sizes_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    small = sp.slim(UpdaterZoo().eval(), x, 0.5)
    assert small.dw.groups < 16 and small.gn.num_channels < 16  # the updaters had work to do
    sp.save(small, tmp_path)
    back = sp.load(tmp_path, UpdaterZoo).eval()
    assert _plain_attributes(back) == _plain_attributes(small)
    assert torch.equal(back(x), small(x))


def test_transformer_round_trip(tmp_path):
    """nn.Transformer's d_model is written by an updater that reads its layers (no tensors of its own)."""
    torch.manual_seed(0)
    src, tgt = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 5))

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.src_embed, self.tgt_embed = nn.Embedding(50, 32), nn.Embedding(50, 32)
            self.transformer = nn.Transformer(32, 4, 1, 1, 64, batch_first=True)
            self.out = nn.Linear(32, 50)

        def forward(self, s, t):
            return self.out(self.transformer(self.src_embed(s), self.tgt_embed(t)))

    small = sp.slim(Seq2Seq().eval(), (src, tgt), 0.5)
    sp.save(small, tmp_path)
    back = sp.load(tmp_path, Seq2Seq).eval()
    assert back.transformer.d_model == small.transformer.d_model
    assert torch.equal(back(src, tgt), small(src, tgt))


def test_an_unpruned_model_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _trained_bn(SmallCNN())
    sp.save(model, tmp_path)
    assert torch.equal(sp.load(tmp_path, SmallCNN).eval()(X), model(X))


def test_the_loaded_model_does_not_alias_the_file(cnn_dir, tmp_path):
    """The weights file is memory-mapped while read: the model must own copies."""
    small, directory = cnn_dir
    copied = _copy(directory, tmp_path)
    back = sp.load(copied, SmallCNN).eval()
    flip_data(WEIGHTS_FILE, 10 ** 6)(copied)  # rewritten in place
    assert _same_state(small, back)


def test_loading_twice_from_one_factory_gives_independent_models(cnn_dir):
    _, directory = cnn_dir
    a, b = sp.load(directory, SmallCNN), sp.load(directory, SmallCNN)
    assert a.conv1.weight is not b.conv1.weight and _same_state(a, b)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_get_the_usual_mode(tmp_path, llama_dir, umask, mode):
    """Item 11: safetensors writes 0600; saved files get 0666 less the umask, as open() would."""
    small, _ = llama_dir
    previous = os.umask(umask)
    try:
        sp.save(small, tmp_path)
    finally:
        os.umask(previous)
    for name in (WEIGHTS_FILE, BUFFERS_FILE, PLAN_FILE):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name


def test_the_plan_records_content_hashes(cnn_dir):
    _, directory = cnn_dir
    plan = _plan(directory)
    assert plan["sha256"] == plan_digest(plan)
    assert plan["files"][WEIGHTS_FILE] == dict(zip(("sha256", "size"), file_digest(directory / WEIGHTS_FILE)))


def test_there_are_at_least_thirty_hostile_variants():
    assert len(CNN_VARIANTS) + len(FACTORY_VARIANTS) + len(LLAMA_VARIANTS) >= 30


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_tied_weights_stay_tied_and_must_agree(tmp_path):
    torch.manual_seed(0)
    sp.save(Tied(), tmp_path)
    back = sp.load(tmp_path, Tied)
    assert back.head.weight is back.emb.weight
    replace_weights(lambda d: {"emb.weight": torch.zeros(10, 8), "head.weight": torch.ones(10, 8)})(tmp_path)
    fresh = Tied()
    snapshot = Snapshot(fresh)
    _raises_load_error(tmp_path, fresh, "differ in the file")
    snapshot.assert_unchanged()
