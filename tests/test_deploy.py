"""Pruned models deploy like any other: torch.compile, torch.export and ONNX export, on a CNN and a
transformer, with outputs equal to the eager pruned model."""
from __future__ import annotations

import io

import onnx
import pytest
import torch
import torchvision
from attention_models import Encoder

import structprune as sp


def _cnn():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    return sp.slim(model, x, 0.5), x


def _transformer():
    torch.manual_seed(0)
    model = Encoder(heads=4, kv_heads=2).eval()
    ids = torch.randint(0, 50, (2, 7))
    return sp.slim(model, ids, 0.5), ids


@pytest.mark.parametrize("build", [_cnn, _transformer], ids=["cnn", "transformer"])
def test_pruned_models_compile_export_and_onnx(build):
    small, x = build()
    with torch.no_grad():
        expected = small(x)
        # the aot_eager backend runs dynamo + AOTAutograd without a C++ toolchain, keeping CI fast
        compiled = torch.compile(small, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)
    exported = torch.export.export(small, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    buffer = io.BytesIO()
    torch.onnx.export(small, (x,), buffer, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    shapes = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    assert any(shape and shape[0] in (32, 16) for shape in shapes.values())  # the pruned widths went out
