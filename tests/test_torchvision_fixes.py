"""Regressions from two torchvision models, each with a small model that reproduces its cause alone.

* RAFT divides its correlation volume ``fmap1^T @ fmap2`` by ``sqrt(C)``, C read from the feature map:
  a channel width used as a number. Pruning C changed that number, so the pruned model no longer matched
  the zeroed original; the contracted channels must stay whole (``ops/width_values.py``).
* Video Swin's ``_get_window_and_shift_size`` writes into the list it is given, and fx interpreters hand
  nodes ``immutable_list`` arguments: every interpreter structprune runs now passes mutable copies
  (``graph/interpreter.py``). Its 3D window attention then needed the rule 2D Swin has.
"""
from __future__ import annotations

import math
from typing import List

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import outputs, slim_exact
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

import structprune as sp
from structprune.graph.interpreter import mutable


# ----- mutable arguments -----------------------------------------------------------------------------------
def _clip_window(window: List[int], size: List[int]) -> List[int]:
    """Shrink ``window`` in place to fit ``size``, as torchvision's ``_get_window_and_shift_size`` does."""
    for i in range(len(window)):
        window[i] = min(window[i], size[i])
    return window


torch.fx.wrap("_clip_window")


class ClippedWindow(nn.Module):
    """Calls a wrapped function that mutates a list fx stores in the graph as a literal."""

    def __init__(self):
        super().__init__()
        self.window = [4, 4]
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        window = _clip_window(list(self.window), [x.shape[-2], x.shape[-1]])
        y = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        return self.conv2(y) * (window[0] * window[1])


def test_mutable_copies_every_fx_immutable_collection():
    frozen = (immutable_list([1, immutable_list([2])]), immutable_dict({"a": immutable_list([3])}), 4)
    copied = mutable(frozen)
    assert copied == ([1, [2]], {"a": [3]}, 4) and type(copied) is tuple
    assert type(copied[0]) is list and type(copied[0][1]) is list and type(copied[1]) is dict
    copied[0][1].append(5)
    assert frozen[0][1] == [2]  # the graph's own arguments are untouched


def test_a_function_that_mutates_its_list_argument_prunes():
    torch.manual_seed(0)
    model = ClippedWindow().eval()
    x = torch.randn(1, 3, 8, 8)
    small, report = slim_exact(model, x, 0.5, tracer="fx")
    node = next(n for n in report.graph.trace.graph.nodes if n.target is _clip_window)
    assert node.args[0] == [4, 4]  # shape propagation and verification ran it on copies
    assert small.conv1.out_channels == 4 and outputs(small, x).shape == (1, 4, 4, 4)


# ----- a channel width used as a number ---------------------------------------------------------------------
class Correlation(nn.Module):
    """RAFT's correlation volume: two feature maps contracted over their channels, divided by a scale.

    ``scale``: ``"pow"`` divides by ``C ** 0.5``, ``"tensor"`` by ``torch.sqrt(torch.tensor(C))`` (as RAFT),
    ``"einsum"`` contracts with einsum and divides by ``C ** 0.5``, with C read from the map at run time;
    ``"stored"`` divides by a constant the module keeps, which pruning leaves alone."""

    def __init__(self, scale: str):
        super().__init__()
        self.scale = scale
        self.norm = 16 ** 0.5 if scale == "stored" else None  # under export, a float attribute reads as stored
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1)

    def forward(self, a, b):
        f1, f2 = (self.conv2(F.relu(self.conv1(x))) for x in (a, b))
        n, c, h, w = f1.shape
        if self.scale == "einsum":
            return torch.einsum("nchw,ncij->nhwij", f1, f2) / c ** 0.5
        corr = torch.matmul(f1.view(n, c, h * w).transpose(1, 2), f2.view(n, c, h * w))
        if self.scale == "tensor":
            return corr / torch.sqrt(torch.tensor(c))
        return corr / (self.norm if self.scale == "stored" else c ** 0.5)


@pytest.mark.parametrize("scale, tracer", [("pow", "fx"), ("pow", "export"), ("tensor", "export"),
                                           ("einsum", "fx"), ("einsum", "export")])
def test_a_contraction_normalised_by_its_width_keeps_those_channels(scale, tracer):
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    small, report = slim_exact(Correlation(scale), x, 0.5, tracer=tracer)
    assert report.graph.trace.tracer == tracer
    # C feeds the value 1/sqrt(C): pruning it would change what the model computes
    assert small.conv2.out_channels == 16 and small.conv1.out_channels == 4


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_stored_scale_leaves_the_contracted_channels_prunable(tracer):
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    small, _ = slim_exact(Correlation("stored"), x, 0.5, tracer=tracer)
    assert small.conv2.out_channels == 8 and math.isclose(small.norm, 4.0)


# ----- the models ------------------------------------------------------------------------------------------
def _removed(report) -> float:
    return 1 - report.params_after / report.params_before


@pytest.mark.slow
def test_raft_small_prunes_and_verifies():
    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    x = (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
    expected = [f.shape for f in outputs(model, x)]
    small, report = sp.slim_with_report(model, x, 0.3)
    assert report.verification.passed and report.verification.exact, report.verification.message
    assert _removed(report) >= 0.2, str(report)
    # the correlation volume's channels stay whole: its 1/sqrt(C) would change with them
    assert small.feature_encoder.conv.out_channels == model.feature_encoder.conv.out_channels
    assert [f.shape for f in outputs(small, x)] == expected


def test_swin3d_t_prunes_and_verifies():
    torch.manual_seed(0)
    model = torchvision.models.video.swin3d_t(weights=None).eval()
    x = torch.randn(1, 3, 4, 64, 64)
    expected = outputs(model, x).shape
    small, report = sp.slim_with_report(model, x, 0.3)
    assert report.verification.passed, report.verification.message
    assert _removed(report) >= 0.2 and not report.unknown_ops, str(report)
    attn = small.features[4][0].attn  # stage 3: 12 heads of 32
    assert attn.num_heads < 12 and attn.qkv.out_features == 3 * 32 * attn.num_heads
    assert attn.relative_position_bias_table.shape[1] == attn.num_heads == small.features[4][5].attn.num_heads
    assert outputs(small, x).shape == expected


def test_3d_window_attention_prunes_whole_heads():
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), ShiftedWindowAttention3d(32, [2, 4, 4], [1, 2, 2], num_heads=4),
                          nn.Linear(32, 8)).eval()
    x = torch.randn(1, 2, 6, 6, 8)
    small, report = sp.slim_with_report(model, x, 0.5)
    assert report.verification.passed and not report.unknown_ops, str(report)
    assert small[1].num_heads == 2 and small[1].qkv.out_features == 48 and small[1].proj.in_features == 16
    assert outputs(small, x).shape == (1, 2, 6, 6, 8)
