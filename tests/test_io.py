"""Saving and loading pruned models: bit-exact round trips, and hostile files refused."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torchvision
import transformers

import structprune as sp
from structprune.tools.io import plan_digest

warnings.filterwarnings("ignore", message=".*token_id.*")


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def saved_resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    small = sp.slim(model, x, 0.5, scope="global")  # widths differ layer by layer
    directory = tmp_path_factory.mktemp("resnet")
    sp.save(small, directory)
    return small, x, directory


def test_torchvision_round_trip_is_bit_exact(saved_resnet):
    small, x, directory = saved_resnet
    back = sp.load(directory, torchvision.models.resnet18).eval()
    assert _same_state(small, back)
    assert back.layer3[0].conv1.out_channels == small.layer3[0].conv1.out_channels
    assert torch.equal(back(x), small(x))


def _llama_config():
    return transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)


def test_hugging_face_round_trip_with_per_layer_widths(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config()).eval()
    ids = torch.randint(3, 100, (2, 10))
    small = sp.slim(model, (ids,), 0.4, scope="global")  # layers end up with different widths
    sp.save(small, tmp_path)
    back = sp.load(tmp_path, lambda: transformers.LlamaForCausalLM(_llama_config())).eval()
    assert _same_state(small, back)
    assert torch.equal(back(ids).logits, small(ids).logits)
    with torch.no_grad():
        assert torch.equal(back.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
                           small.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0))


def _copy_saved(directory, tmp_path):
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    return tmp_path


def _edit_plan(directory, edit, sign=True):
    """Edit the plan; ``sign``: store the new content hash too, as a deliberate editor would, so that
    the checks behind the hash are reached."""
    path = directory / "structprune.json"
    plan = json.loads(path.read_text())
    edit(plan)
    if sign:
        plan["sha256"] = plan_digest(plan)
    path.write_text(json.dumps(plan))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "structprune.json").unlink(), "not a saved structprune model"),
    (lambda d: (d / "structprune.json").write_text("{not json"), "not valid JSON"),
    (lambda d: _edit_plan(d, lambda p: p.update(format="pickle")), "not a structprune plan"),
    (lambda d: _edit_plan(d, lambda p: p.update(version=99)), "version"),
    (lambda d: _edit_plan(d, lambda p: p["tensors"].pop("fc.bias")), "does not match this model"),
    (lambda d: _edit_plan(d, lambda p: p["tensors"]["fc.bias"].update(shape=[5000])), "cannot come from pruning"),
    (lambda d: _edit_plan(d, lambda p: p["tensors"]["fc.bias"].update(shape=["__import__('os')"])), "invalid shape"),
    (lambda d: _edit_plan(d, lambda p: p.update(tensors=[])), "must be a JSON object"),
    (lambda d: _edit_plan(d, lambda p: p["attributes"]["conv1"].update(stride=[1, 1]), sign=False), "content hash"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "truncated"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}..."), "truncated"),
])
def test_hostile_or_damaged_files_are_refused(saved_resnet, tmp_path, damage, message):
    _, _, directory = saved_resnet
    target = _copy_saved(directory, tmp_path)
    damage(target)
    fresh = torchvision.models.resnet18()
    with pytest.raises(sp.LoadError, match=message):
        sp.load(target, fresh)


def test_a_plan_for_another_architecture_is_refused(saved_resnet):
    _, _, directory = saved_resnet
    with pytest.raises(sp.LoadError, match="does not match this model"):
        sp.load(directory, torchvision.models.resnet34)


def test_loading_sets_only_plain_attributes_the_model_already_has(saved_resnet, tmp_path):
    _, x, directory = saved_resnet
    target = _copy_saved(directory, tmp_path)

    def inject(plan):
        plan["attributes"]["conv1"]["forward"] = "os.system('echo pwned')"  # a method name: not plain data
        plan["attributes"]["conv1"]["brand_new"] = 1  # an attribute the module does not have
    _edit_plan(target, inject)
    back = sp.load(target, torchvision.models.resnet18())
    assert callable(back.conv1.forward) and not hasattr(back.conv1, "brand_new")
    assert back.eval()(x).shape == (1, 1000)


def test_report_summary_and_graph_files(tmp_path):
    import networkx as nx

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    small = sp.slim(model, x, 0.5)
    rep = sp.report(model, small, x, latency=False)
    assert rep.params == (sp.count_parameters(model), sp.count_parameters(small))
    assert rep.macs[1] < rep.macs[0] and ("layer1.0.conv1", 64, 32) in rep.layers
    assert "layers narrower" in str(rep)
    rep.plot(str(tmp_path / "widths.png"))
    assert (tmp_path / "widths.png").read_bytes()[:4] == b"\x89PNG"
    graph = sp.DependencyGraph(model, x)
    table = graph.summary(limit=3)
    assert "prunable" in table and "more groups" in table
    graph.write(str(tmp_path / "g.graphml"))
    assert nx.read_graphml(tmp_path / "g.graphml").number_of_nodes() == graph.to_networkx().number_of_nodes()
