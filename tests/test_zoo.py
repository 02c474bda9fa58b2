"""Every torchvision classification model (random weights) prunes at ratio 0.5 and verifies.

Convolutional models must also remove at least 0.9x the fraction of parameters Torch-Pruning 1.6.1
removes at the same ratio (figures measured by ``benchmarks/engine_speed.py --all`` and stored in
``data/torch_pruning_removed.json`` so CI needs no Torch-Pruning). Attention models must at least
shrink their MLP widths.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision  # noqa: E402

import structprune as sp  # noqa: E402

MODELS = torchvision.models.list_models(module=torchvision.models)
FIXED_SIDE = {"vit_": 224, "maxvit_t": 224}  # these models only accept one resolution
MIN_SIDE = {"inception_v3": 299}  # its training-only auxiliary head needs the full resolution
ATTENTION = ("vit_", "swin_", "maxvit_")
BIG = 60_000_000  # parameters: anything larger is marked slow (still part of the default run)
_TP_FILE = Path(__file__).parent / "data" / "torch_pruning_removed.json"
TP_REMOVED = {k: v for k, v in json.loads(_TP_FILE.read_text()).items() if not k.startswith("_")}
_PARAMS = {
    # build cost is dominated by weight init; a rough size tells which cases are slow
    name: size for name, size in (("regnet_y_128gf", 644), ("vit_h_14", 632), ("regnet_y_32gf", 145),
                                  ("vit_l_16", 304), ("vit_l_32", 306), ("convnext_large", 198),
                                  ("regnet_x_32gf", 107), ("efficientnet_v2_l", 118), ("vgg19_bn", 143),
                                  ("vgg19", 143), ("vgg16_bn", 138), ("vgg16", 138), ("vgg13_bn", 133),
                                  ("vgg13", 133), ("vgg11_bn", 132), ("vgg11", 132), ("wide_resnet101_2", 126),
                                  ("swin_v2_b", 87), ("swin_b", 87), ("convnext_base", 88), ("vit_b_16", 86),
                                  ("vit_b_32", 88), ("resnext101_64x4d", 83), ("regnet_y_16gf", 83),
                                  ("resnext101_32x8d", 88), ("regnet_x_16gf", 54), ("alexnet", 61))
}


def _side(name: str) -> int:
    fixed = next((side for prefix, side in FIXED_SIDE.items() if name.startswith(prefix)), None)
    return fixed if fixed is not None else max(64, MIN_SIDE.get(name, 0))


def _case(name: str):
    marks = [pytest.mark.slow] if _PARAMS.get(name, 0) * 1_000_000 > BIG else []
    return pytest.param(name, marks=marks, id=name)


def _shapes(output) -> list:
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    return [shape for item in output for shape in _shapes(item)]


def _mlp_hidden_widths(model: nn.Module) -> dict:
    """out_features of every expanding Linear inside an MLP block (the MLP's hidden width)."""
    return {n: m.out_features for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and "mlp" in n.lower() and m.out_features > m.in_features}


@pytest.mark.parametrize("name", [_case(n) for n in MODELS])
def test_torchvision_model_prunes_and_verifies(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    side = _side(name)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        expected = model(x)
    small, report = sp.slim_with_report(model, x, 0.5)
    assert report.verification.passed, report.verification.message
    assert type(small) is type(model)
    removed = 1 - report.params_after / report.params_before
    assert removed > 0.25, str(report)
    with torch.no_grad():
        assert small(x).shape == expected.shape
        x2 = torch.randn(2, 3, side, side)
        assert small(x2).shape == (2,) + tuple(expected.shape[1:])
        # training mode runs branches eval mode skips (auxiliary heads): they must still fit
        model.train(), small.train()
        assert _shapes(small(x2)) == _shapes(model(x2))
    if name.startswith(ATTENTION):
        before = _mlp_hidden_widths(model)
        after = {n: m.out_features for n, m in small.named_modules() if n in before}
        assert before and all(after[k] <= before[k] // 2 for k in before), (before, after)
    elif name in TP_REMOVED:
        assert removed >= 0.9 * TP_REMOVED[name], f"removed {removed:.1%}, Torch-Pruning {TP_REMOVED[name]:.1%}"
