"""What a new user gets wrong, and what they are told (issue 16, items 5, 6 and 11).

* ``ignore=`` / ``ratios=`` entries that name no module raise with the closest names; a parent (by name or
  instance) covers every module in it, also part by part and along a schedule's steps;
* framework errors become hints: the default loss on a language model's logits, an fp16 input into an
  fp32 model, a TorchScript module;
* an empty example input, channels_last weights, NaN scores, and how to run a quick subset of the tests.
"""
from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
import torchvision
from torch import nn

import structprune as sp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Blocks(nn.Module):
    """A stem, a block of two convolutions (a parent with children) and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                   nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _blocks() -> Blocks:
    torch.manual_seed(0)
    return Blocks().eval()


def _widths(model: nn.Module) -> dict:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---- item 5: patterns that match nothing raise; a parent covers its children ---------------------------------
@pytest.mark.parametrize("options, named", [
    ({"ignore": ["blok.0"]}, "'blok.0'"),
    ({"ignore": ["does.not.exist"]}, "'does.not.exist'"),
    ({"ratios": {"nomatch.*": 0.7}}, "'nomatch.*'"),
    ({"ignore": [nn.Embedding]}, "Embedding"),
    ({"ignore": [nn.Linear(16, 4)]}, "module instance"),
])
def test_an_entry_that_names_no_module_raises(options, named):
    with pytest.raises(sp.InvalidOptionError, match=re.escape(named)):
        sp.slim(_blocks(), X, 0.5, **options)


def test_the_error_suggests_the_closest_module_names():
    with pytest.raises(sp.InvalidOptionError, match=r"did you mean 'block.0'"):
        sp.slim(_blocks(), X, 0.5, ignore=["blok.0"])


def test_a_parent_by_name_or_instance_covers_its_children():
    model = _blocks()
    assert _widths(sp.slim(model, X, 0.5)) == {"stem.0": 8, "block.0": 8, "block.2": 8}
    assert _widths(sp.slim(model, X, 0.5, ignore=["block"])) == {"stem.0": 8, "block.0": 16, "block.2": 16}
    assert _widths(sp.slim(model, X, 0.5, ignore=[model.block])) == {"stem.0": 8, "block.0": 16, "block.2": 16}
    assert _widths(sp.slim(model, X, 0.5, ignore=["block.*"])) == {"stem.0": 8, "block.0": 16, "block.2": 16}


def test_a_ratio_for_a_parent_applies_to_every_layer_in_it():
    model = _blocks()
    widths = _widths(sp.slim(model, X, 0.0, ratios={"block": 0.75}, round_to=None))
    assert widths == {"stem.0": 16, "block.0": 4, "block.2": 4}
    # a pattern naming the layer itself wins over its parent's
    widths = _widths(sp.slim(model, X, 0.0, ratios={"block": 0.75, "block.2": 0.5}, round_to=None))
    assert widths == {"stem.0": 16, "block.0": 4, "block.2": 8}


def test_a_schedule_keeps_an_ignored_instance_whole_in_every_step():
    model = _blocks()
    # every step after the first prunes a copy, in which the caller's instance does not appear
    pruner = sp.Pruner(model, X, 0.5, schedule=sp.Iterative(steps=2), ignore=[model.block], round_to=None)
    assert _widths(pruner.run()) == {"stem.0": 8, "block.0": 16, "block.2": 16}
    with pytest.raises(sp.InvalidOptionError, match="'nope'"):
        sp.Pruner(model, X, 0.5, ignore=["nope"])  # at construction, not at the first step


class Gated(nn.Module):
    """Data-dependent control flow around two traceable parts: pruned part by part."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        y = self.body(x).mean((2, 3))
        if y.sum() > 0:  # neither torch.fx nor torch.export captures this whole
            return self.head(y)
        return -self.head(y)


def _gated() -> Gated:
    torch.manual_seed(0)
    return Gated().eval()


def test_part_by_part_a_parent_and_an_instance_cover_their_part():
    model = _gated()
    small, report = sp.slim_with_report(model, X, 0.5)
    assert isinstance(report, sp.PiecewiseReport)
    assert (small.body[0].out_channels, small.head[0].out_features) == (8, 16)
    small = sp.slim(model, X, 0.5, ignore=["body"])  # names a part: covers all of it
    assert (small.body[0].out_channels, small.head[0].out_features) == (16, 16)
    small = sp.slim(model, X, 0.5, ignore=[model.head])  # the parts are pruned on a copy: still covered
    assert (small.body[0].out_channels, small.head[0].out_features) == (8, 32)
    small = sp.slim(model, X, 0.0, ratios={"body": 0.75}, round_to=None)
    assert (small.body[0].out_channels, small.head[0].out_features) == (4, 32)


def test_part_by_part_an_entry_is_checked_against_the_whole_model_only():
    model = _gated()
    # names a module of one part only: no error in the other part
    small = sp.slim(model, X, 0.5, ignore=["head.0"])
    assert (small.body[0].out_channels, small.head[0].out_features) == (8, 32)
    with pytest.raises(sp.InvalidOptionError, match="did you mean 'head.0'"):
        sp.slim(model, X, 0.5, ignore=["haed.0"])
    with pytest.raises(sp.InvalidOptionError, match="'nomatch'"):
        sp.slim_submodules(model, X, 0.5, ratios={"nomatch": 0.5})


def _readme_ignore_example() -> str:
    """The README's ``sp.slim(model, x, 0.5, ignore=...)`` call, comments stripped."""
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index("sp.slim(model, x, 0.5, ignore=")
    lines, depth = [], 0
    for line in text[start:].splitlines():
        code = line.split("#")[0].rstrip()
        lines.append(code)
        depth += code.count("(") - code.count(")")
        if depth == 0:
            return "\n".join(lines)
    raise AssertionError("unbalanced README example")


def test_the_readme_ignore_example_changes_what_resnet18_loses():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    plain = sp.slim(model, x, 0.5, verify=False)
    example = _readme_ignore_example().replace("0.5,", "0.5, verify=False,", 1)
    shaped = eval(example, {"sp": sp, "nn": nn, "model": model, "x": x})
    assert _widths(shaped) != _widths(plain)
    assert shaped.conv1.out_channels == model.conv1.out_channels  # what it ignores keeps its channels


# ---- item 6: framework errors become hints ------------------------------------------------------------------
class TinyLM(nn.Module):
    """Logits of shape (batch, tokens, vocabulary), like a Hugging Face causal LM."""

    def __init__(self, vocab: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.lm_head = nn.Linear(16, vocab)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.lm_head(h + self.mlp(h))


def test_the_default_loss_on_token_logits_points_to_loss_fn():
    torch.manual_seed(0)
    model, ids = TinyLM().eval(), torch.randint(0, 32, (2, 6))
    with pytest.raises(sp.InvalidOptionError) as caught:
        sp.slim(model, (ids,), 0.5, criterion="taylor", data=[(ids, ids)], verify=False)
    message = str(caught.value)
    assert "cross-entropy" in message and "(2, 6, 32)" in message and "(2, 6)" in message
    assert "loss_fn=lambda model, batch: model(input_ids=batch[0], labels=batch[1]).loss" in message
    # the loss it suggests the shape of works
    loss_fn = lambda model, batch: nn.functional.cross_entropy(model(batch[0]).flatten(0, 1),  # noqa: E731
                                                                batch[1].flatten())
    sp.slim(model, (ids,), 0.5, criterion="taylor", data=[(ids, ids)], loss_fn=loss_fn, verify=False)


class DictClassifier(nn.Module):
    """Returns ``{"logits": ...}``, as many vision and Hugging Face models do with plain dicts."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return {"logits": self.body(x)}


def test_the_default_loss_and_distillation_read_logits_from_the_same_outputs():
    # one reading of "the logits" everywhere: a dict output works for gradient criteria as it does for distill
    from structprune.tools.outputs import logits_of

    torch.manual_seed(0)
    model, x = DictClassifier().eval(), torch.randn(4, 8)
    batches = [(x, torch.tensor([0, 1, 2, 0]))]
    small = sp.slim(model, x, 0.5, criterion="taylor", data=batches)
    assert small.body[0].out_features == 8
    t = torch.ones(2)
    assert all(logits_of(out) is t for out in (t, {"logits": t}, (t, None), [t]))
    assert logits_of({"scores": t}) is None and logits_of(()) is None


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("model_dtype, input_dtype", [(torch.float32, torch.float16),
                                                      (torch.float16, torch.float32)])
def test_an_input_of_another_dtype_than_the_model_says_so(model_dtype, input_dtype):
    model = _mlp().to(model_dtype)
    with pytest.raises(sp.ExampleInputError) as caught:
        sp.slim(model, torch.randn(2, 8, dtype=input_dtype), 0.5)
    message = str(caught.value)
    assert str(input_dtype) in message and str(model_dtype) in message and f"x.to({model_dtype})" in message


class CastsItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _mlp()

    def forward(self, x):
        return self.mlp(x.to(self.mlp[0].weight.dtype))


def test_a_model_that_casts_its_input_is_not_refused():
    small = sp.slim(CastsItsInput().eval(), torch.randn(2, 8, dtype=torch.float16), 0.5)
    assert small.mlp[0].out_features == 8


@pytest.mark.parametrize("compile_", ["script", "trace"])
def test_a_torchscript_module_asks_for_the_original_module(compile_):
    model = _blocks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated: its warning is not what this tests
        compiled = torch.jit.script(model) if compile_ == "script" else torch.jit.trace(model, X)
    expected = re.escape("Pass the original nn.Module (before torch.jit.script/trace)")
    with pytest.raises(sp.InvalidModelError, match=expected):
        sp.slim(compiled, X, 0.5)
    with pytest.raises(sp.InvalidModelError, match=expected):
        sp.DependencyGraph(compiled, X)
    assert sp.count_parameters(compiled) == sp.count_parameters(model)  # measuring one is fine


# ---- item 11: empty inputs, channels_last, NaN scores, a quick subset ---------------------------------------
def test_an_empty_example_input_cannot_verify():
    with pytest.raises(sp.ExampleInputError, match=r"empty \(shape \(0, 3, 8, 8\)\).*verify=False"):
        sp.slim(_blocks(), X[:0], 0.5)


def test_channels_last_weights_stay_channels_last():
    for inplace in (False, True):  # a sliced copy, and the model itself shrunk
        model = _blocks().to(memory_format=torch.channels_last)
        small = sp.slim(model, X.to(memory_format=torch.channels_last), 0.5, inplace=inplace)
        for name, conv in small.named_modules():
            if isinstance(conv, nn.Conv2d):
                assert conv.weight.is_contiguous(memory_format=torch.channels_last), name
        assert small.block[0].weight.shape == (8, 8, 3, 3)


def test_a_criterion_returning_nan_names_itself_and_the_group():
    def zero_norm_ratio(group, context):
        return torch.full((group.n_units,), float("nan"))

    with pytest.raises(sp.StructPruneError, match=r"criterion 'zero_norm_ratio' returned NaN .* of group \d+"):
        sp.slim(_blocks(), X, 0.5, criterion=zero_norm_ratio)


def test_the_readme_says_how_to_run_a_quick_subset():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert 'python -m pytest -q -m "not slow"' in readme
    assert '"slow:' in open(os.path.join(REPO, "pyproject.toml")).read()  # the marker the command deselects


def test_a_quantized_model_is_refused_with_what_to_do():
    # every weight is a packed integer: nothing could be pruned, and it would come back unchanged without a word
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        model = torch.ao.quantization.quantize_dynamic(_mlp())
    with pytest.raises(sp.InvalidModelError, match="quantized .*DynamicQuantizedLinear.*Prune the float model"):
        sp.slim(model, torch.randn(2, 8), 0.5)
