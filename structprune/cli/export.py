"""``structprune export``: write a (pruned) model as a deployment artifact, checked against eager PyTorch.

Two formats, chosen by the file's suffix:

- ``.pt2``: :func:`torch.export.save` of :func:`torch.export.export` (the graph as JSON, plain tensors
  as raw bytes), read back with :func:`torch.export.load` and run on the example input;
- ``.onnx``: :func:`torch.onnx.export` (TorchScript exporter: it needs no onnxscript), a protobuf,
  checked with ``onnx.checker`` when ``onnx`` is installed.

The file is written next to its destination under a temporary name and moved into place only once it
is complete and checked, so a failed export leaves nothing behind and never half a file.
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Callable, Dict

from ..errors import StructPruneError

if TYPE_CHECKING:
    import torch
    from torch import nn

EXPORT_FORMATS = (".pt2", ".onnx")


class ExportError(StructPruneError, RuntimeError):
    """The model cannot be written in the format asked for."""


class ExportMismatchError(ExportError):
    """The exported program, read back, does not reproduce the eager model's output."""


def _export_pt2(model: nn.Module, example_input: torch.Tensor, path: str) -> str:
    import torch

    from ..graph.capture import output_tensors

    with torch.no_grad():
        expected = output_tensors(model(example_input))
        torch.export.save(torch.export.export(model, (example_input,)), path)
        got = output_tensors(torch.export.load(path).module()(example_input))
    if [t.shape for t in got] != [t.shape for t in expected]:
        raise ExportMismatchError(f"the exported program returns shapes {[tuple(t.shape) for t in got]}, the model "
                                  f"{[tuple(t.shape) for t in expected]}")
    error = max((_relative_difference(g, e) for g, e in zip(got, expected)), default=0.0)
    if not math.isfinite(error) or error > 1e-4:
        raise ExportMismatchError(f"the exported program's output differs from the model's by {error:.2e} "
                                  f"(relative to its largest value)")
    return f"torch.export program, read back with torch.export.load: largest difference {error:.1e} (relative)"


def _relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``expected`` (0 for equal integer tensors)."""
    if not expected.is_floating_point():
        return 0.0 if bool((got == expected).all()) else math.inf
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return float((got - expected).abs().max()) / max(scale, 1e-12) if expected.numel() else 0.0


def _export_onnx(model: nn.Module, example_input: torch.Tensor, path: str) -> str:
    import importlib.util

    import torch

    # the TorchScript exporter needs no onnxscript; its deprecation notice is addressed to us, not to the user
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(model, (example_input,), path, dynamo=False)
        except Exception as error:
            raise ExportError(f"the ONNX exporter cannot export this model: {type(error).__name__}: {error}. "
                              f"Export to a .pt2 file instead (torch.export covers more operators)") from error
    if importlib.util.find_spec("onnx") is None:
        return "ONNX model (not checked: pip install onnx to run onnx.checker on it)"
    import onnx

    onnx.checker.check_model(onnx.load(path))
    return "ONNX model, checked with onnx.checker"


_WRITERS: Dict[str, Callable[[nn.Module, torch.Tensor, str], str]] = {".pt2": _export_pt2, ".onnx": _export_onnx}


def export_model(model: nn.Module, example_input: torch.Tensor, path: str) -> str:
    """Write ``model`` traced on ``example_input`` to ``path`` (``.pt2`` or ``.onnx``); return what was
    written and how it was checked. Nothing is left at ``path`` if anything fails."""
    from ..tools.io import new_file_mode

    suffix = os.path.splitext(path)[1]
    write = _WRITERS[suffix]
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(suffix=suffix, dir=directory, prefix=".structprune-export-")
    os.close(handle)
    try:
        description = write(_without_cache(model).eval(), example_input, temporary)
        os.chmod(temporary, new_file_mode())  # mkstemp's 0o600 would hide the file from the group
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return description


def _without_cache(model: nn.Module) -> nn.Module:
    """A Hugging Face generator returns its key/value cache, an object neither exporter can return: the
    artifact computes the logits of the whole input (generation re-runs it), as ``use_cache=False`` does."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False  # type: ignore[union-attr]
    return model
