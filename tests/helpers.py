"""Shared test helpers."""
from __future__ import annotations

import copy
import socket

import torch
from torch import nn

import structprune as sp


class Small(nn.Module):
    """conv -> BN -> ReLU -> conv -> mean pool -> linear: a small model whose channels are coupled across layers."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def snapshot(model: torch.nn.Module) -> dict:
    """A deep copy of everything that must not change: tensors and plain module attributes."""
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    attrs = {name: {k: copy.copy(v) for k, v in vars(m).items() if not k.startswith("_")}
             for name, m in model.named_modules()}
    return {"state": state, "attrs": attrs, "training": [m.training for m in model.modules()]}


def assert_unchanged(model: torch.nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert state[k].shape == v.shape and torch.equal(state[k], v), f"{k} changed"
    for name, m in model.named_modules():
        now = {k: v for k, v in vars(m).items() if not k.startswith("_")}
        assert now == snap["attrs"][name], f"attributes of {name!r} changed"
    assert [m.training for m in model.modules()] == snap["training"]


def slim_exact(model, x, ratio=0.5, **kwargs):
    """slim with verification; assert it compared values exactly and parameters went down."""
    model.eval()
    small, report = sp.slim_with_report(model, x, ratio, **kwargs)
    assert report.verification.passed, report.verification.message
    assert report.verification.exact, report.verification.message
    assert report.params_after < report.params_before, str(report)
    return small, report


def outputs(model, x):
    with torch.no_grad():
        return model(*x) if isinstance(x, tuple) else model(x)


def tiny_llama(layers: int = 2, vocab: int = 100, **config):
    """A randomly initialised LlamaForCausalLM small enough for unit tests (64 wide, 4 query / 2 key-value
    heads), in eval mode; ``config`` overrides any LlamaConfig field."""
    import transformers

    torch.manual_seed(0)
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=vocab)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config})).eval()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
