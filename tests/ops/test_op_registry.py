"""The op registry: one OpSpec per target, listable, scoped overrides, warnings, validated keys."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structprune as sp
from structprune.ops import (
    find_updater,
    input_axis,
    is_weighted,
    list_ops,
    module_spec,
    override,
    register_op,
    shape_function_for,
    weighted_layers,
    width_of,
)
from structprune.ops.registry import lookup

X = torch.randn(1, 3, 8, 8)


def _specs():
    return {spec.target: spec for spec in list_ops()}


def test_list_ops_lists_every_family_with_its_facts():
    specs = _specs()
    conv = specs[nn.Conv2d]
    assert conv.kind == "module" and conv.rule is not None and conv.shape is not None and conv.update is not None
    assert specs[nn.modules.conv._ConvNd].width == "out_channels"
    assert specs[nn.modules.conv._ConvNd].input_axes == {"weight": 1}
    linear = specs[nn.Linear]
    assert (linear.width, linear.input_axes, linear.weighted) == ("out_features", {"weight": 1}, True)
    assert linear.shape is not None and linear.update is not None
    for cls in (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.MultiheadAttention, nn.PReLU,
                nn.Flatten, nn.ReLU, nn.MaxPool2d):
        assert specs[cls].rule is not None, cls
    assert specs["transformers.pytorch_utils.Conv1D"].update is not None
    assert specs[F.relu].kind == "function" and specs[".view"].kind == "method"
    assert specs["aten.conv2d"].kind == "aten" and specs["namedtuple"].kind == "container"
    assert all(spec.name.startswith("aten.") for spec in list_ops("aten"))
    assert sp.list_ops is list_ops and sp.OpSpec is type(conv)


def test_module_facts_resolve_along_the_class_hierarchy():
    conv, deconv = nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(3, 8, 3)
    assert module_spec(conv).update is find_updater(deconv)
    assert (input_axis(conv, "weight"), input_axis(deconv, "weight"), input_axis(conv, "bias")) == (1, 0, None)
    assert input_axis(nn.BatchNorm2d(4), "weight") is None and input_axis(None, "weight") is None
    widths = [width_of(m) for m in (conv, nn.Linear(3, 5), nn.BatchNorm1d(6), nn.ReLU())]
    assert widths == [8, 5, 6, None]
    assert width_of(nn.GroupNorm(2, 6)) == 6 and width_of(nn.Embedding(10, 7)) == 7
    assert is_weighted(conv) and is_weighted(nn.Linear(2, 2)) and not is_weighted(deconv)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2, bias=False))
    assert [name for name, _ in weighted_layers(model)] == ["0", "3"]

    class OwnForward(nn.Conv2d):  # a subclass that computes something else: no rule, no shape formula
        def forward(self, x):
            return super().forward(x) * 2

    class SameForward(nn.Conv2d):
        pass

    mine, same = OwnForward(3, 8, 1), SameForward(3, 8, 1)
    assert module_spec(mine).rule is None and shape_function_for(mine) is None
    assert find_updater(mine) is find_updater(conv) and width_of(mine) == 8  # metadata hold for any subclass
    assert module_spec(same).rule is module_spec(conv).rule


def test_same_shape_list_is_the_unary_module_list():
    from structprune.ops import activation

    for cls in activation._UNARY_MODULES + activation._SOFTMAX_MODULES:
        assert module_spec(cls).shape is activation.same_shape, cls


def test_override_is_scoped_and_restores_the_previous_rule():
    original = module_spec(nn.Linear).rule

    def fake(ctx, node):
        return ctx.unlabeled_output()

    with override(nn.Linear, rule=fake):
        assert module_spec(nn.Linear).rule is fake
    assert module_spec(nn.Linear).rule is original
    with pytest.raises(RuntimeError, match="inside"):
        with override(nn.Linear, rule=fake):
            raise RuntimeError("inside")
    assert module_spec(nn.Linear).rule is original

    with override():  # whatever the public decorators register inside is gone afterwards
        @sp.rule(torch.fliplr)
        def fliplr(ctx, node):
            return ctx.tlabel(ctx.arg(0))

        @sp.updater(nn.Identity)
        def identity_updater(module, old):
            pass

        assert _specs()[torch.fliplr].rule is fliplr and find_updater(nn.Identity()) is identity_updater
    assert torch.fliplr not in _specs() and find_updater(nn.Identity()) is None


def test_registering_another_rule_or_updater_for_a_target_warns():
    def first(ctx, node):
        return None

    def second(ctx, node):
        return None

    with override():
        sp.rule(torch.fliplr)(first)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sp.rule(torch.fliplr)(first)  # the same function again: nothing replaced
        with pytest.warns(UserWarning, match="fliplr: registering a new rule replaces"):
            sp.rule(torch.fliplr)(second)
        with pytest.warns(UserWarning, match="new update replaces"):
            sp.updater(nn.Linear)(lambda module, old: None)


def test_the_built_in_registrations_never_replace_each_other():
    code = ("import warnings; warnings.filterwarnings('error', message='.*replaces the one registered before'); "
            "import structprune")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_invalid_targets_raise_a_structprune_error():
    with pytest.raises(sp.InvalidOptionError, match="names no ATen operator"):
        sp.rule("aten.definitely_not_an_op")(lambda ctx, node: None)
    with pytest.raises(sp.StructPruneError, match="'.method', 'aten.op' or 'module.ClassName'"):
        sp.rule("view")(lambda ctx, node: None)
    with pytest.raises(ValueError, match="unknown op facts"):
        register_op(nn.Linear, colour="blue")
    assert "aten.definitely_not_an_op" not in _specs()


def test_class_name_keys_apply_without_importing_the_class():
    class Widget(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    key = f"{Widget.__module__}.{Widget.__qualname__}"

    def update(module, old):
        module.size = module.weight.numel()

    with override(key, update=update, width="size", input_axes={"weight": 0}):
        assert find_updater(Widget()) is update and input_axis(Widget(), "weight") == 0
    assert find_updater(Widget()) is None


def test_ignored_conv_still_follows_a_narrower_input():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    small = sp.slim(model, X, 0.5, ignore=[model[2]])
    assert small[0].out_channels == 4 and small[2].in_channels == 4  # the ignored layer reads fewer inputs
    assert small[2].out_channels == 8  # and keeps its own filters


def test_lookup_strips_in_place_suffixes_through_the_registry():
    graph = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    node = next(n for n in graph.graph.nodes if n.op == "call_module")
    assert lookup(node, dict(graph.named_modules())) is module_spec(nn.ReLU).rule
