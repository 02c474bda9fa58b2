"""``structprune export`` (issue 16, the CLI's export path): a model saved by ``slim --out`` becomes a
torch.export program or an ONNX file that computes what the reloaded model computes; bad destinations
fail before anything is built, and a failed export leaves no file behind."""
from __future__ import annotations

import os
import textwrap

import onnx
import pytest
import torch

import structprune as sp
from structprune.cli import export as export_module
from structprune.cli.main import main
from structprune.graph.capture import output_tensors

NET = """
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x):
            return x + self.bn(self.conv(x)).relu()

    def build():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(), Block(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(16, 5))
"""


@pytest.fixture()
def saved(tmp_path, capsys):
    """``(spec, saved directory, the reloaded pruned model, example input)`` after ``structprune slim --out``."""
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(NET))
    spec = f"{path}:build"
    out = tmp_path / "small"
    assert main(["slim", spec, "--input", "2x3x12x12", "--ratio", "0.5", "--round-to", "none", "--no-latency",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    namespace: dict = {}
    exec(textwrap.dedent(NET), namespace)
    model = sp.load(str(out), namespace["build"]()).eval()
    return spec, str(out), model, torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def test_pt2_export_runs_like_the_reloaded_pruned_model(saved, tmp_path, capsys):
    spec, directory, model, _ = saved
    target = tmp_path / "small.pt2"
    assert main(["export", directory, "--model", spec, "--input", "2x3x12x12", "--out", str(target)]) == 0
    assert "torch.export.load" in capsys.readouterr().out
    program = torch.export.load(str(target))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
    assert model[0].out_channels == 8  # the pruned width, not the original 16
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".structprune-export-")]


def test_onnx_export_writes_a_valid_model_of_the_pruned_widths(saved, tmp_path, capsys):
    spec, directory, _, _ = saved
    target = tmp_path / "small.onnx"
    assert main(["export", directory, "--model", spec, "--input", "2x3x12x12", "--out", str(target)]) == 0
    assert "onnx.checker" in capsys.readouterr().out
    proto = onnx.load(str(target))
    onnx.checker.check_model(proto)
    first_conv = next(t for t in proto.graph.initializer if tuple(t.dims)[1:] == (3, 3, 3))
    assert first_conv.dims[0] == 8


@pytest.mark.parametrize("name, reason", [("small.pth", "writes .pt2 or .onnx"),
                                          ("missing/small.pt2", "does not exist"), ("existing.pt2", "exists")])
def test_a_bad_destination_fails_with_usage_before_any_model_is_built(saved, tmp_path, capsys, name, reason):
    spec, directory, _, _ = saved
    (tmp_path / "existing.pt2").write_bytes(b"keep me")
    status = main(["export", directory, "--model", "no_such_file.py:build", "--out", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert status == 2 and reason in err and err.startswith("structprune:")
    assert (tmp_path / "existing.pt2").read_bytes() == b"keep me"


def test_a_failed_export_leaves_no_file(saved, tmp_path, capsys, monkeypatch):
    spec, directory, _, _ = saved

    def half_written(model, x, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("exporter crashed")

    monkeypatch.setitem(export_module._WRITERS, ".pt2", half_written)
    status = main(["export", directory, "--model", spec, "--input", "2x3x12x12", "--out", str(tmp_path / "a.pt2")])
    assert status == 1 and "exporter crashed" in capsys.readouterr().err
    assert not (tmp_path / "a.pt2").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".structprune-export-")]


def test_an_export_that_does_not_reproduce_the_model_raises(tmp_path):
    class Noisy(torch.nn.Module):  # a different result every call: the program read back cannot match it
        def forward(self, x):
            return x + torch.randn_like(x)

    with pytest.raises(export_module.ExportMismatchError, match="differs"):
        export_module.export_model(Noisy(), torch.ones(2, 3), str(tmp_path / "noisy.pt2"))
    assert os.listdir(tmp_path) == []


def test_a_hugging_face_language_model_exports_its_logits_without_the_cache(tmp_path, capsys):
    # a causal LM returns its key/value cache, which no exporter can return: the program computes the logits
    out, target = tmp_path / "llama", tmp_path / "llama.pt2"
    assert main(["slim", "hf:LlamaForCausalLM", "--ratio", "0.5", "--no-latency", "--out", str(out)]) == 0
    assert main(["export", str(out), "--model", "hf:LlamaForCausalLM", "--out", str(target)]) == 0
    capsys.readouterr()
    tokens = torch.randint(0, 1000, (1, 16))
    program = torch.export.load(str(target)).module()
    pruned = sp.load(str(out), fresh_llama()).eval()
    assert pruned.config.hidden_size < 64  # the saved model is the pruned one, and the program is that model
    with torch.no_grad():
        (logits,) = output_tensors(program(tokens))
        torch.testing.assert_close(logits, pruned(tokens, use_cache=False).logits)
    assert logits.shape == (1, 16, 1000)


def fresh_llama() -> torch.nn.Module:
    from structprune.cli.main import build_model

    return build_model("hf:LlamaForCausalLM")[0]
