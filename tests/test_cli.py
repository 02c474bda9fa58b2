"""The ``structprune`` console command, run for real in a subprocess."""
from __future__ import annotations

import shutil
import subprocess
import textwrap

import torchvision

import structprune as sp

EXE = shutil.which("structprune")


def run(*args, cwd=None):
    assert EXE, "the structprune console script is not installed (pip install -e .)"
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_reads_well_and_exits_zero():
    result = run("--help")
    assert result.returncode == 0
    for command in ("inspect", "slim", "load", "bench", "demo"):
        assert command in result.stdout
    assert "Exit status" in result.stdout


def test_inspect_prints_the_group_table_and_writes_the_graph(tmp_path):
    result = run("inspect", "torchvision:resnet18", "--input", "1x3x64x64", "--write", str(tmp_path / "g.dot"))
    assert result.returncode == 0, result.stderr
    assert "groups" in result.stdout and "prunable" in result.stdout
    assert (tmp_path / "g.dot").read_text().startswith("graph channels {")


def test_slim_saves_a_model_that_loads_back(tmp_path):
    out = tmp_path / "small"
    result = run("slim", "torchvision:resnet18", "--input", "1x3x64x64", "--ratio", "0.5", "--no-latency",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "params" in result.stdout and "verification passed" in result.stdout
    small = sp.load(out, torchvision.models.resnet18)
    assert small.layer1[0].conv1.out_channels == 32


def test_slim_a_factory_from_a_python_file(tmp_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def build_net():
            return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    """))
    result = run("slim", "my_models.py:build_net", "--input", "1x3x16x16", "--ratio", "0.5", "--no-latency",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 of 2 layers narrower" in result.stdout


def test_bench_and_hugging_face_specs():
    result = run("bench", "torchvision:resnet18", "--input", "1x3x32x32", "--ratios", "0,0.5")
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip().startswith(("0.00", "0.50"))]) == 2
    result = run("inspect", "hf:BertModel", "--limit", "3")
    assert result.returncode == 0, result.stderr


def test_errors_exit_with_their_documented_status_through_the_console_script():
    # the cases themselves are in tests/test_cli_errors.py (in-process); here the script's exit status is real
    bad_spec = run("slim", "nowhere:model")
    assert bad_spec.returncode == 2 and bad_spec.stderr.startswith("structprune: unknown model source")
    bad_ratio = run("slim", "torchvision:resnet18", "--input", "1x3x32x32", "--ratio", "1.5")
    assert bad_ratio.returncode == 2 and bad_ratio.stderr.startswith("structprune: argument --ratio: ")
    usage = run("slim")
    assert usage.returncode == 2 and usage.stderr.startswith("structprune: ")  # argparse: missing model


def test_demo_runs_the_built_in_example():
    result = run("demo")
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "latency" in result.stdout
