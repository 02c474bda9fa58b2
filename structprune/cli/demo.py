"""A runnable tour: prune a model and show what changed.

    python -m structprune.demo                 # torchvision resnet18 (random weights), ratio 0.5
    python -m structprune.demo --model mobilenet_v2 --ratio 0.3

Prints the groups that were pruned, then parameters, MACs and CPU latency before and after.
Falls back to a small built-in CNN when torchvision is not installed.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from ..slim import slim_whole_model
from ..tools.metrics import count_macs, count_parameters, latency_ms


class TinyCNN(nn.Module):
    """A small residual CNN used when torchvision is unavailable."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.Conv2d(64, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def build(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        print("torchvision is not installed: using the built-in TinyCNN")
        return TinyCNN()
    return torchvision.models.get_model(name, weights=None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision model name (random weights)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per group")
    parser.add_argument("--size", type=int, default=224, help="input side")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build(args.model).eval()
    x = torch.randn(1, 3, args.size, args.size)
    small, report = slim_whole_model(model, x, args.ratio)

    print(f"\n{args.model}: {report.graph.summary(limit=12)}")
    print("\nlargest pruned groups (units before -> after, first members):")
    ranked = sorted(report.pruned_groups.items(), key=lambda kv: -kv[1][0])
    for gid, (before, after) in ranked[:8]:
        members = ", ".join(f"{s.tensor}[{s.dim}]" for s in report.graph.groups[gid].spaces[:3])
        print(f"  group {gid:3d}: {before:4d} -> {after:4d}   {members}, ...")
    if len(ranked) > 8:
        print(f"  ... and {len(ranked) - 8} more groups")
    print(f"\n{report.verification}\n")

    rows = [("parameters", count_parameters(model), count_parameters(small)),
            ("MACs", count_macs(model, x), count_macs(small, x))]
    for label, before, after in rows:
        print(f"{label:>12}: {before:>15,} -> {after:>15,}   ({after / before:.2f}x)")
    before_ms, after_ms = latency_ms(model, x), latency_ms(small, x)
    print(f"{'latency':>12}: {before_ms:>12.2f} ms -> {after_ms:>12.2f} ms   "
          f"({before_ms / after_ms:.2f}x faster, CPU, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
