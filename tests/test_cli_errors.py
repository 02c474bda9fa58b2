"""The command line's errors (issue 16, item 4), run in-process through ``main()``: fast, and the same code
the console script runs (tests/test_cli.py runs that script for real).

Every error starts with ``structprune:``, keeps every line of its own message, leaves out torch.export's
graph dumps, and exits 2 for bad usage (checked before any model is built) or 1 for a failed run; the
user's own broken model file gets a message naming what failed and where, never a traceback.
"""
from __future__ import annotations

import importlib
import textwrap
from typing import List, Tuple

import pytest

from structprune.cli.main import clean_message, main, parser, slim_options

cli_main = importlib.import_module("structprune.cli.main")  # the module: structprune.cli.main is also the function

NET = """
    import torch.nn as nn

    def build():
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
"""


def cli(capsys: pytest.CaptureFixture, *argv: str) -> Tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``structprune ARGV``."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def write(folder, name: str, code: str) -> str:
    path = folder / name
    path.write_text(textwrap.dedent(code))
    return str(path)


def test_a_trace_error_is_printed_whole_without_torch_export_graph_dumps(tmp_path, capsys):
    model = write(tmp_path, "dyn.py", """
        import torch.nn as nn

        class Dyn(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

            def forward(self, x):
                y = self.a(x)
                if y.sum() > 0:  # data-dependent: neither tracer can follow it
                    y = y * 2
                return self.b(y)

        def build():
            return Dyn()
    """)
    status, _, err = cli(capsys, "inspect", f"{model}:build", "--input", "1x3x16x16")
    assert status == 1
    assert err.startswith("structprune: TraceError: could not capture the model's graph.")
    # both tracers' reasons and the hint: the lines the first-line-only printing lost
    for line in ("  torch.fx: ", "  torch.export: ", "Make the failing op traceable"):
        assert line in err
    assert "def forward(self" not in err and "TORCH_LOGS" not in err and "Traceback" not in err


def test_clean_message_drops_code_dumps_and_torch_advice_but_keeps_our_lines():
    text = textwrap.dedent('''\
        could not capture the model's graph.
          torch.fx: TraceError: symbolically traced variables cannot be used as inputs to control flow
          torch.export: UserError: Could not guard on data-dependent expression



        def forward(self, arg0_1: "f32[8, 3, 3, 3]", arg4_1: "f32[1, 3, 16, 16]"):
            # File: dyn.py:12 in forward, code: if y.sum() > 0:
            sum_1: "f32[]" = torch.ops.aten.sum.default(conv2d);  conv2d = None

            item = torch.ops.aten.item.default(ne);  ne = item = None
        consider using data-dependent friendly APIs such as guard_or_false.
        For more information, run with TORCH_LOGS="dynamic"
        While executing %conv1 : [num_users=1] = call_module[target=conv1](args = (%x,), kwargs = {})
        Original traceback:
        None
        Make the failing op traceable and try again.
    ''')
    assert clean_message(text) == [
        "could not capture the model's graph.",
        "  torch.fx: TraceError: symbolically traced variables cannot be used as inputs to control flow",
        "  torch.export: UserError: Could not guard on data-dependent expression",
        "",
        "Make the failing op traceable and try again.",
    ]


def test_out_that_is_a_file_or_cannot_be_written_fails_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    built: List[str] = []
    monkeypatch.setattr(cli_main, "build_model", lambda spec: built.append(spec))
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    status, _, err = cli(capsys, "slim", "torchvision:resnet18", "--out", str(existing))
    assert status == 2 and err.startswith("structprune: argument --out: ") and "is an existing file" in err
    status, _, err = cli(capsys, "slim", "torchvision:resnet18", "--out", str(existing / "small"))
    assert status == 2 and "is a file, not a directory" in err

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_main.tempfile, "TemporaryFile", refuse)  # what a read-only place does, even to root
    status, _, err = cli(capsys, "slim", "torchvision:resnet18", "--out", str(tmp_path / "small"))
    assert status == 2 and "cannot write in" in err and "Permission denied" in err
    assert built == [] and existing.read_text() == "keep me" and not (tmp_path / "small").exists()


def test_a_model_file_that_is_broken_gets_a_message_naming_what_failed_and_where(tmp_path, capsys):
    models = write(tmp_path, "models.py", """
        import torch.nn as nn

        def needs(depth):
            return nn.Linear(depth, 2)

        def raises():
            return nn.Sequential(nn.Conv2d(3, 8, 3), undefined_layer)
    """)
    syntax = write(tmp_path, "syntax.py", "import torch.nn as nn\ndef build(:\n    return nn.Linear(2, 2)\n")

    status, _, err = cli(capsys, "slim", f"{models}:raises", "--input", "1x3x8x8")
    assert status == 1
    assert err.startswith(f"structprune: {models}:raises() failed: NameError: name 'undefined_layer' is not defined")
    assert "line 8, in raises" in err and "Traceback" not in err

    status, _, err = cli(capsys, "slim", f"{models}:needs", "--input", "1x3x8x8")
    assert status == 2 and "needs arguments (depth)" in err and "Traceback" not in err

    status, _, err = cli(capsys, "slim", f"{syntax}:build", "--input", "1x2")
    assert status == 1 and err.startswith(f"structprune: importing {syntax} failed: SyntaxError")
    assert "line 2: def build(:" in err and "Traceback" not in err

    status, _, err = cli(capsys, "slim", f"{models}:nothere", "--input", "1x2")
    assert status == 2 and "has no function 'nothere'; it defines needs, raises" in err

    status, _, err = cli(capsys, "slim", "--traceback", f"{models}:raises", "--input", "1x3x8x8")
    assert status == 1 and "Traceback" in err  # asked for, for a bug report


@pytest.mark.parametrize("argv", [
    ["slim", "torchvision:resnet18", "--criterion", "bogus"],
    ["bench", "torchvision:resnet18", "--ratios", "0,abc"],
    ["inspect", "torchvision:resnet18", "--write", "g.png"],
    ["slim", "torchvision:resnet18", "--ratio", "1.5"],
    ["slim", "torchvision:resnet18", "--target", "flops=0.5"],
    ["slim", "torchvision:resnet18", "--round-to", "0"],
    ["slim", "torchvision:resnet18", "--ratios", "layer4"],
    ["inspect", "torchvision:resnet18", "--input", "1xAx3"],
    ["slim", "nowhere:model"],
    ["load", "no/such/dir", "--model", "torchvision:resnet18"],
    ["slim"],
    ["frobnicate"],
], ids=lambda argv: " ".join(argv))
def test_bad_usage_exits_2_with_a_structprune_message(argv, capsys):
    status, _, err = cli(capsys, *argv)
    assert status == 2, err
    assert err.startswith("structprune: ") and "Traceback" not in err and "usage:" not in err


def test_version_and_help(capsys):
    status, out, _ = cli(capsys, "--version")
    assert status == 0 and out.startswith("structprune 0.1.0")
    status, out, _ = cli(capsys, "slim", "--help")
    assert status == 0
    for option in ("--target", "--round-to", "--ignore", "--ratios", "--out", "--traceback"):
        assert option in out


def test_slim_options_are_those_of_the_api():
    args = parser().parse_args(["slim", "m.py:f", "--target", "macs=0.4", "--round-to", "none", "--ignore", "fc,stem",
                                "--ignore", "layer4.*", "--ratios", "layer1=0.2,layer2.*=0.3", "--ratios", "head=0",
                                "--criterion", "fpgm", "--scope", "global", "--no-verify"])
    assert slim_options(args) == dict(criterion="fpgm", scope="global", target={"macs": 0.4}, round_to=None,
                                      verify=False, ignore=["fc", "stem", "layer4.*"],
                                      ratios={"layer1": 0.2, "layer2.*": 0.3, "head": 0.0})
    assert slim_options(parser().parse_args(["slim", "m.py:f"]))["round_to"] == "auto"


def test_slim_with_per_layer_options_saves_and_load_reloads(tmp_path, capsys):
    net = write(tmp_path, "net.py", NET)
    out = tmp_path / "small"
    status, stdout, err = cli(capsys, "slim", f"{net}:build", "--input", "1x3x16x16", "--ignore", "0",
                              "--ratios", "2=0.75", "--round-to", "none", "--no-latency", "--out", str(out))
    assert status == 0, err
    assert "1 of 3 layers narrower" in stdout and "16 -> 4" in stdout and f"structprune load {out}" in stdout
    status, stdout, err = cli(capsys, "load", str(out), "--model", f"{net}:build", "--input", "1x3x16x16",
                              "--no-latency")
    assert status == 0, err
    assert stdout.startswith(f"loaded {out} into {net}:build") and "16 -> 4" in stdout
    # a name that matches no module is rejected by the library: usage, exit 2
    status, _, err = cli(capsys, "slim", f"{net}:build", "--input", "1x3x16x16", "--ignore", "nothere",
                         "--no-latency")
    assert status == 2 and err.startswith("structprune: InvalidOptionError: ignore entry 'nothere' matches no")
