"""The ``structprune`` command: inspect, slim and benchmark models from the shell.

    structprune demo                                     # the built-in example: what was pruned, before/after
    structprune inspect torchvision:resnet50             # the coupled channel groups
    structprune slim torchvision:resnet50 --ratio 0.5 --criterion l2 --out small/
    structprune bench timm:convnext_tiny --ratios 0,0.25,0.5
    structprune slim my_models.py:build_net --input 1x3x64x64 --ratio 0.3
    structprune slim torchvision:resnet50 --target latency=0.5 --device cuda --dtype bfloat16 --input 64x3x224x224

Models are named ``torchvision:NAME`` and ``timm:NAME`` (random weights), ``hf:CLASS`` (a Hugging
Face class with a small random config) or ``path/to/file.py:FACTORY`` (a function returning the
model). Exit status: 0 on success, 2 for a bad command line or model spec, 1 when pruning fails;
errors go to stderr as one line starting with ``structprune:``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
from torch import nn

from ..errors import InvalidOptionError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_HF_SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, n_embd=64, n_layer=2, n_head=4, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                 max_position_embeddings=128, n_positions=128, image_size=32, patch_size=8)


class SpecError(InvalidOptionError):
    """A model spec or input shape that cannot be used (bad usage: exit status 2)."""


def parse_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SpecError(f"--input must look like 1x3x224x224, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise SpecError(f"--input must have positive sizes, got {text!r}")
    return shape


def build_model(spec: str) -> Tuple[nn.Module, Optional[Tuple[int, ...]], str]:
    """``(model in eval mode, default input shape or None, kind of input)`` for a model spec."""
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise SpecError(f"model spec must be torchvision:NAME, timm:NAME, hf:CLASS or file.py:FACTORY, got {spec!r}")
    if source == "torchvision":
        import torchvision
        try:
            return torchvision.models.get_model(name, weights=None).eval(), (1, 3, 224, 224), "image"
        except ValueError as error:
            raise SpecError(f"torchvision has no model {name!r} ({error})") from None
    if source == "timm":
        import timm
        try:
            model = timm.create_model(name, pretrained=False).eval()
        except RuntimeError as error:
            raise SpecError(f"timm has no model {name!r} ({error})") from None
        pretrained_cfg = cast(Dict[str, Any], model.pretrained_cfg)  # a plain dict on every timm model
        return model, tuple([1] + list(pretrained_cfg.get("input_size", (3, 224, 224)))), "image"
    if source == "hf":
        return _hugging_face(name)
    if source.endswith(".py"):
        return _from_file(source, name), None, "image"
    raise SpecError(f"unknown model source {source!r}: use torchvision:, timm:, hf: or a .py file")


def _hugging_face(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    config_cls = getattr(cls, "config_class", None)
    if cls is None or config_cls is None:
        raise SpecError(f"transformers has no model class {name!r}")
    defaults = config_cls()
    # _HF_SMALL names the fields of several families (BERT, GPT-2, LLaMA, ViT): each config takes its own
    small = {k: v for k, v in _HF_SMALL.items() if hasattr(defaults, k)}
    model = cls(config_cls(**small)).eval()
    vision = hasattr(defaults, "image_size") and hasattr(defaults, "num_channels")
    return model, ((1, 3, small.get("image_size", 32), small.get("image_size", 32)) if vision else (1, 16)), \
        ("image" if vision else "tokens")


def _from_file(path: str, factory: str) -> nn.Module:
    if not os.path.isfile(path):
        raise SpecError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:  # no loader for this kind of file
        raise SpecError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the user's own code, named on the command line
    build = getattr(module, factory, None)
    if not callable(build):
        raise SpecError(f"{path} has no function {factory!r}")
    model = build()
    if not isinstance(model, nn.Module):
        raise SpecError(f"{path}:{factory}() returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def example_input(shape: Optional[Tuple[int, ...]], kind: str, model: nn.Module) -> torch.Tensor:
    if shape is None:
        raise SpecError("this model needs --input (e.g. --input 1x3x64x64)")
    if kind == "tokens":
        vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
        return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _load(args) -> Tuple[nn.Module, torch.Tensor]:
    model, default, kind = build_model(args.model)
    shape = parse_shape(args.input) if args.input else default
    x = example_input(shape, kind, model)
    device, dtype = getattr(args, "device", None), getattr(args, "dtype", None)
    if device or dtype:
        model = model.to(device=device, dtype=getattr(torch, dtype) if dtype else None)
        x = x.to(device=device, dtype=getattr(torch, dtype) if dtype and x.is_floating_point() else None)
    return model, x


def parse_target(text: Optional[str]) -> Optional[Dict[str, float]]:
    """``latency=0.5`` -> ``{"latency": 0.5}`` (also ``params=`` and ``macs=``)."""
    if text is None:
        return None
    kind, _, value = text.partition("=")
    try:
        return {kind.strip(): float(value)}
    except ValueError:
        raise SpecError(f"--target takes KIND=FRACTION, e.g. --target latency=0.5 or --target params=0.3; "
                        f"got {text!r}") from None


def parse_round_to(text: str) -> Any:
    """``auto``, ``none`` or a positive integer."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError:
        raise SpecError(f"--round-to takes auto, none or a positive integer; got {text!r}") from None


# ---- commands ---------------------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    import structprune as sp

    model, x = _load(args)
    graph = sp.DependencyGraph(model, x)
    print(graph.summary(limit=args.limit))
    if args.write:
        graph.write(args.write)
        print(f"graph written to {args.write}")
    return EXIT_OK


def cmd_slim(args) -> int:
    import structprune as sp

    model, x = _load(args)
    small, slim_report = sp.slim_with_report(model, x, args.ratio, criterion=args.criterion, scope=args.scope,
                                             target=parse_target(args.target),
                                             round_to=parse_round_to(args.round_to), verify=not args.no_verify)
    print(slim_report)
    print(sp.report(model, small, x, latency=not args.no_latency))
    if args.out:
        sp.save(small, args.out)
        print(f"saved to {args.out} (model.safetensors + structprune.json; reload with structprune.load)")
    return EXIT_OK


def cmd_bench(args) -> int:
    import structprune as sp

    from ..tools.metrics import count_macs, count_parameters, latency_ms
    from ..tools.progress import progress_bar

    model, x = _load(args)
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"{'ratio':>6} {'params':>14} {'MACs':>16} {'latency':>12}")
    bar = progress_bar(len(ratios), "ratios") if len(ratios) > 1 else None
    for ratio in ratios:
        small = model if ratio == 0 else sp.slim(model, x, ratio, criterion=args.criterion, verify=False)
        print(f"{ratio:>6.2f} {count_parameters(small):>14,} {count_macs(small, x):>16,} "
              f"{latency_ms(small, x):>9.2f} ms", flush=True)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    demo_main([])
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="structprune", description="Structured pruning of PyTorch models.",
                                  epilog="model specs: torchvision:NAME, timm:NAME, hf:CLASS (small random config), "
                                         "path/to/file.py:FACTORY. Exit status 0 ok, 1 pruning failed, 2 bad usage.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("model", help="torchvision:NAME, timm:NAME, hf:CLASS or path/to/file.py:FACTORY")
        p.add_argument("--input", help="example input shape, e.g. 1x3x224x224 (token ids for hf: text models)")
        return p

    p = model_command("inspect", "show the coupled channel groups of a model")
    p.add_argument("--limit", type=int, default=40, help="rows of the group table (default 40)")
    p.add_argument("--write", metavar="FILE", help="also write the graph (.graphml or .dot)")
    p.set_defaults(run=cmd_inspect)
    p = model_command("slim", "prune a model and print what changed")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per layer (default 0.5)")
    p.add_argument("--criterion", default="l2", help="l2 (default), l1, magnitude, fpgm, bn_scale, random")
    p.add_argument("--scope", default="local", choices=["local", "global"])
    p.add_argument("--target", metavar="KIND=F", help="remove a fraction of params, macs or the measured latency "
                                                     "instead of a ratio, e.g. latency=0.5")
    p.add_argument("--round-to", default="auto", metavar="N",
                   help="keep widths multiples of N; auto (default): what the device runs well; none: exact")
    p.add_argument("--device", help="run (and time) the model on this device, e.g. cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert the model to this dtype")
    p.add_argument("--out", metavar="DIR", help="save the pruned model here (safetensors + JSON plan)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the original")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.set_defaults(run=cmd_slim)
    p = model_command("bench", "parameters, MACs and CPU latency at several ratios")
    p.add_argument("--ratios", default="0,0.25,0.5", help="comma-separated ratios (default 0,0.25,0.5)")
    p.add_argument("--criterion", default="l2")
    p.set_defaults(run=cmd_bench)
    p = sub.add_parser("demo", help="prune the built-in example and print the before/after report")
    p.set_defaults(run=cmd_demo)
    return top


def main(argv: Optional[List[str]] = None) -> int:
    from ..errors import StructPruneError

    args = parser().parse_args(argv)
    try:
        return args.run(args)
    # SpecError first: it is also an InvalidOptionError (a ValueError), but a bad spec is usage, exit 2
    except SpecError as error:
        print(f"structprune: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (StructPruneError, ValueError) as error:
        print(f"structprune: {type(error).__name__}: {str(error).splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
