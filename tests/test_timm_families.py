"""One small model from every timm model family (random weights) prunes at ratio 0.5 and verifies.

The fixed list is ``data/timm_families.json``: for each timm module that registers models, its smallest
variant by parameter count, the smallest input it runs on, and any constructor keywords (``img_size``
for fixed-resolution models). ``benchmarks/timm_families.py`` regenerates it after a timm upgrade; the
test never calls ``timm.list_models()``. Each entry records the measured build + prune + verify time on
one thread; entries over ``_slow_seconds`` are marked slow (still part of the default run, as in CI).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import structprune as sp

timm = pytest.importorskip("timm")

_FILE = Path(__file__).parent / "data" / "timm_families.json"
_DATA = json.loads(_FILE.read_text())
FAMILIES = _DATA["families"]
SLOW_SECONDS = _DATA["_slow_seconds"]


def _case(family: str):
    entry = FAMILIES[family]
    marks = []
    if entry.get("seconds", 0) > SLOW_SECONDS:
        marks.append(pytest.mark.slow)
    if entry.get("status") == "fails":  # temporary: known failures, to be fixed in the library
        marks.append(pytest.mark.xfail(strict=True, reason=f"{entry.get('error')}: {entry.get('message', '')[:200]}"))
    return pytest.param(family, marks=marks, id=f"{family}-{entry['model']}")


@pytest.mark.parametrize("family", [_case(f) for f in FAMILIES])
def test_timm_family_prunes_and_verifies(family):
    entry = FAMILIES[family]
    name = entry["model"]
    if name not in timm.list_models(name):
        pytest.skip(f"{name} is not in timm {timm.__version__} (list made with timm {_DATA['_timm_version']}): "
                    "regenerate with benchmarks/timm_families.py")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **entry.get("kwargs", {})).eval()
    torch.manual_seed(0)
    x = torch.randn(1, *entry["input_size"])
    with torch.no_grad():
        expected = model(x)
    small, report = sp.slim_with_report(model, x, 0.5)
    assert report.verification is not None and report.verification.passed, str(report)
    with torch.no_grad():
        assert small(x).shape == expected.shape
    if entry.get("nothing_prunable"):  # the report must say why nothing was removed
        assert report.graph.unknown_ops or report.graph.notes, str(report)
    else:
        assert report.params_after < report.params_before, str(report)
