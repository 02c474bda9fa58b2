"""Models that cannot be captured whole (detectors) are pruned part by part: the largest submodules that
capture on their own, each on the input it receives, each verified; the whole pruned model still runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune as sp
from structprune.errors import InvalidOptionError, TraceError
from structprune.piecewise import PiecewiseReport, find_parts, record_inputs
from tests.helpers import assert_unchanged, snapshot


def conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stage1, self.stage2 = conv(3, 16), conv(16, 32), conv(32, 32)

    def forward(self, x):
        x = self.stage1(self.stem(x))
        return [x, self.stage2(nn.functional.max_pool2d(x, 2))]


class ListHead(nn.Module):
    """One shared tower over every feature level: ``for`` over a list input, which fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(conv(32, 24), nn.Conv2d(24, 5, 1))

    def forward(self, features):
        return [self.tower(f) for f in features]


class Detector(nn.Module):
    """A backbone and heads around post-processing whose control flow depends on the data."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = ListHead()
        self.refine = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, images):
        scores = [s.flatten(2).transpose(1, 2) for s in self.head(self.backbone(images))]
        boxes = []
        for level in scores:
            keep = level[..., 0] > 0  # data-dependent: neither fx nor torch.export captures it whole
            boxes.append(self.refine(level[keep]) if keep.any() else level.new_zeros(0, 4))
        return {"boxes": torch.cat(boxes), "levels": len(boxes)}


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _detector():
    torch.manual_seed(0)
    return Detector().eval()


def test_an_untraceable_model_prunes_its_traceable_parts():
    model = _detector()
    kept = snapshot(model)
    small, report = sp.slim_with_report(model, X, 0.5)
    assert isinstance(report, PiecewiseReport)
    assert set(report.parts) == {"backbone", "head", "refine"}
    assert report.verification is not None and report.verification.passed
    assert report.params_after < 0.8 * report.params_before
    assert "torch.fx" in report.trace_error
    # interfaces keep their widths: the backbone's outputs feed the head, the head's feed the refiner
    assert small.backbone.stage2[0].out_channels == 32 and small.head.tower[1].out_channels == 5
    assert small.backbone.stem[0].out_channels == 8 and small.head.tower[0][0].out_channels == 12
    out = small(X)
    assert set(out) == {"boxes", "levels"} and out["boxes"].shape[1] == 4
    assert_unchanged(model, kept)
    assert "pruned one by one" in str(report) and "backbone" in str(report)


def test_parts_are_found_top_down_with_the_inputs_they_receive():
    model = _detector()
    recorded = record_inputs(model, X)
    assert recorded["backbone"][0].shape == X.shape
    assert isinstance(recorded["head"][0], list) and len(recorded["head"][0]) == 2  # a list of feature maps
    parts, kept = find_parts(model, recorded)
    assert parts == ["backbone", "head", "refine"] and not kept


def test_a_part_called_several_times_is_reported():
    model = _detector()
    _, report = sp.slim_with_report(model, X, 0.5)
    # the refiner runs once per feature level where something was kept
    calls = [note for note in report.notes if note.startswith("refine was called")]
    assert len(calls) <= 1


def test_whole_model_patterns_apply_to_the_parts():
    model = _detector()
    small = sp.slim(model, X, 0.5, ignore=["backbone.stem.0"], ratios={"head.tower.0.*": 0.25})
    assert small.backbone.stem[0].out_channels == 16
    assert small.head.tower[0][0].out_channels == 18


def test_inplace_swaps_the_pruned_parts_into_the_callers_model():
    model = _detector()
    small = sp.slim(model, X, 0.5, inplace=True)
    assert small is model and model.backbone.stem[0].out_channels == 8
    assert model(X)["boxes"].shape[1] == 4


def test_options_that_need_the_whole_graph_are_refused_clearly():
    model = _detector()
    kept = snapshot(model)
    with pytest.raises(InvalidOptionError, match="could not be captured whole"):
        sp.slim(model, X, 0.5, criterion="taylor", data=[X], loss_fn=lambda m, b: m(b)["boxes"].sum())
    assert_unchanged(model, kept)


def test_nothing_traceable_raises_the_trace_error():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.weight if x.sum() > 0 else x

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Opaque()

        def forward(self, x):
            return self.inner(x) if x.mean() > -10 else x

    with pytest.raises(TraceError, match="no submodule"):
        sp.slim(Wrapper().eval(), torch.randn(2, 4), 0.5)


@pytest.mark.slow
def test_torchvision_faster_rcnn_prunes_backbone_fpn_and_heads():
    from torchvision.models import detection

    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
    images = ([torch.rand(3, 224, 256)],)
    small, report = sp.slim_with_report(model, images, 0.3)
    assert {"backbone", "rpn.head", "roi_heads.box_head"} <= set(report.parts)
    assert report.verification.passed
    assert report.params_after <= 0.8 * report.params_before
    assert report.parts["backbone"].params_after < report.parts["backbone"].params_before  # FPN and body
    with torch.no_grad():
        out = small(*images)
    assert isinstance(out, list) and set(out[0]) == {"boxes", "labels", "scores"}
