"""Depth pruning: residual blocks found in the graph, ranked by block influence, removed whole.

Tiny random models (nothing is downloaded): Hugging Face decoders must keep generating with their KV
cache and round-trip through save_pretrained/from_pretrained; torchvision's ResNet keeps its output
shape; a stack without shortcuts has nothing to remove.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
import transformers
from torch import nn

import structprune as sp
from structprune.depth.find import find_blocks

warnings.filterwarnings("ignore", message=".*token_id.*")

IDS = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
DATA = [torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(i)) for i in range(2)]
LAYERS = [f"model.layers.{i}" for i in range(5)]


def _decoder(config_cls=transformers.LlamaConfig, layers=5, **extra):
    torch.manual_seed(0)
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, **extra)
    return getattr(transformers, config_cls.__name__.replace("Config", "ForCausalLM"))(config).eval()


def _generate(model, use_cache):
    return model.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_llama_loses_one_layer_and_still_generates_saves_and_loads(tmp_path):
    model = _decoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert sp.residual_blocks(model, IDS) == LAYERS

    small, report = sp.remove_blocks(model, IDS, fraction=0.2, data=DATA)

    assert len(small.model.layers) == 4 and small.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2, 3]
    layer_keys = {k.split(".")[2] for k in small.state_dict() if k.startswith("model.layers.")}
    assert layer_keys == {"0", "1", "2", "3"}  # renumbered: contiguous state_dict keys
    assert torch.equal(_generate(small, True), _generate(small, False))
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(small))
    # the caller's model and config are untouched
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3, 4]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the report
    assert list(report.removed) == [min(report.scores, key=report.scores.get)]
    assert report.candidates == LAYERS and report.calibrated and report.verified
    assert report.stacks == {"model.layers": (5, 4)} and report.params_after < report.params_before
    assert "removed 1 of 5 residual blocks" in str(report) and "num_hidden_layers: 5 -> 4" in str(report)


def test_a_layer_that_is_the_identity_has_no_influence_and_goes_first():
    model = _decoder()
    with torch.no_grad():  # layer 2 adds zero to both residual branches: its output is its input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = sp.block_influence(model, DATA)
    assert list(scores) == LAYERS
    assert scores["model.layers.2"] < 1e-6 < min(v for k, v in scores.items() if k != "model.layers.2")

    small, report = sp.remove_blocks(model, IDS, n=1, data=DATA)

    assert list(report.removed) == ["model.layers.2"]
    assert torch.allclose(_logits(small), _logits(model), atol=1e-5)
    # the layer that was model.layers.3 is now model.layers.2, with its weights
    assert torch.equal(small.model.layers[2].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)


def test_without_data_the_example_input_ranks_with_a_warning():
    model = _decoder(layers=3)
    with pytest.warns(UserWarning, match="calibration data"):
        _, report = sp.remove_blocks(model, IDS, n=1)
    assert not report.calibrated and "example input alone" in str(report)


def test_qwen2_sliding_window_layers_follow_the_removal():
    # layer_types: full, full, sliding, sliding (the first max_window_layers use full attention)
    model = _decoder(transformers.Qwen2Config, layers=4, use_sliding_window=True, sliding_window=4,
                     max_window_layers=2)
    small, report = sp.remove_blocks(model, IDS, blocks=["model.layers.0"])
    assert small.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert small.config.max_window_layers == 1 and model.config.max_window_layers == 2
    assert torch.equal(_generate(small, True), _generate(small, False))
    assert not any(note.startswith("warning") for note in report.notes)


def test_mistral_loses_one_layer_and_generates_with_its_cache():
    model = _decoder(transformers.MistralConfig, layers=3, sliding_window=4)
    small, _ = sp.remove_blocks(model, IDS, n=1, data=DATA)
    assert small.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    assert torch.equal(_generate(small, True), _generate(small, False))


def test_resnet_blocks_with_a_downsample_are_not_candidates():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    assert sp.residual_blocks(model, x) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]

    small, report = sp.remove_blocks(model, x, n=2, data=[x])

    assert len(report.removed) == 2 and report.verified
    assert sum(len(getattr(small, f"layer{i}")) for i in range(1, 5)) == 6
    with torch.no_grad():
        assert small(x).shape == model(x).shape == (1, 1000)
    explicit, _ = sp.remove_blocks(model, x, blocks=["layer2.1", "layer3.1"])
    assert len(explicit.layer2) == 1 and not any(k.startswith("layer2.1.") for k in explicit.state_dict())
    assert len(model.layer2) == 2
    with pytest.raises(sp.InvalidOptionError, match="layer1.0, layer1.1, layer2.1"):
        sp.remove_blocks(model, x, blocks=["layer2.0"])  # its shortcut is a downsample


def test_a_stack_without_shortcuts_has_nothing_to_remove():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    x = torch.randn(2, 8)
    assert sp.residual_blocks(model, x) == []
    with pytest.raises(sp.InvalidOptionError, match="no removable residual blocks"):
        sp.remove_blocks(model, x, n=1)


def test_unknown_paths_and_impossible_requests_are_refused():
    model = _decoder(layers=3)
    with pytest.raises(sp.InvalidOptionError, match="model.layers.0, model.layers.1, model.layers.2"):
        sp.remove_blocks(model, IDS, blocks=["model.layers.7"])
    with pytest.raises(sp.InvalidOptionError, match="every entry"):
        sp.remove_blocks(model, IDS, blocks=["model.layers.0", "model.layers.1", "model.layers.2"])
    with pytest.raises(sp.InvalidOptionError, match="at most 2"):
        sp.remove_blocks(model, IDS, fraction=1.0, data=DATA)
    with pytest.raises(sp.InvalidOptionError, match="exactly one"):
        sp.remove_blocks(model, IDS, n=1, fraction=0.5)
    with pytest.raises(sp.InvalidOptionError, match="not the path of a submodule"):
        sp.block_influence(model, DATA, blocks=["model.nowhere"])
    assert model.config.num_hidden_layers == 3


class Residual(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.f(x)


class Plain(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.f = nn.Linear(width, width)

    def forward(self, x):
        return self.f(x)


def test_residual_blocks_are_the_innermost_with_a_shortcut():
    model = nn.Sequential(Residual(), Plain(), Residual(), nn.Sequential(Residual(), Residual()))
    assert sp.residual_blocks(model, torch.randn(2, 8)) == ["0", "2", "3.0", "3.1"]
    small, _ = sp.remove_blocks(model, torch.randn(2, 8), blocks=["2", "3.0"])
    assert [type(m).__name__ for m in small] == ["Residual", "Plain", "Sequential"] and len(small[2]) == 1


class Branchy(nn.Module):
    """Data-dependent control flow: neither torch.fx nor torch.export captures it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Residual(), Residual(), Residual()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if x.sum() > -1e9 else x
        return x


def test_an_untraceable_model_falls_back_to_shape_and_class():
    found = find_blocks(Branchy(), torch.randn(2, 8), tracer="fx")
    assert found.paths == ["blocks.0", "blocks.1", "blocks.2"]
    assert any("could not be captured" in note for note in found.notes)


def test_influence_streams_generators_and_dict_batches():
    model = _decoder(layers=3)
    batches = ({"input_ids": ids} for ids in DATA)  # one-shot: its first batch also finds the candidates
    scores = sp.block_influence(model, batches)
    assert scores == pytest.approx(sp.block_influence(model, DATA))
    assert all(0 <= value <= 2 for value in scores.values())


class Scaled(nn.Module):
    """torch's own transformer layers (traced through their stand-in forwards) and a forward of two
    positional arguments."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(3)])

    def forward(self, x, scale):
        for layer in self.layers:
            x = layer(x) * scale
        return x


def test_torch_transformer_layers_and_a_tuple_example_input():
    torch.manual_seed(0)
    model, example = Scaled().eval(), (torch.randn(2, 5, 16), torch.tensor(1.0))
    with pytest.warns(UserWarning, match="calibration data"):
        small, report = sp.remove_blocks(model, example, n=1)  # the pair is two arguments, not (inputs, targets)
    assert report.candidates == ["layers.0", "layers.1", "layers.2"] and len(small.layers) == 2
    # traced into, so their shortcut is seen rather than assumed from their class
    assert not any("taken as residual blocks by their shape and class" in note for note in report.notes)
    assert small(*example).shape == (2, 5, 16)
