"""The ``structprune`` command: inspect, slim, reload and benchmark models from the shell.

    structprune demo                                     # the built-in example: what was pruned, before/after
    structprune inspect torchvision:resnet50             # the coupled channel groups
    structprune slim torchvision:resnet50 --ratio 0.5 --criterion l2 --out small/
    structprune load small/ --model torchvision:resnet50 # reload what slim --out saved, and compare
    structprune export small/ --model torchvision:resnet50 --out small.pt2   # or small.onnx, for deployment
    structprune bench timm:convnext_tiny --ratios 0,0.25,0.5
    structprune slim my_models.py:build_net --input 1x3x64x64 --ratio 0.3 --ignore fc --ratios 'layer4.*=0.7'
    structprune slim torchvision:resnet50 --target latency=0.5 --device cuda --dtype bfloat16 --input 64x3x224x224

Models are named ``torchvision:NAME`` and ``timm:NAME`` (random weights), ``hf:CLASS`` (a Hugging
Face class with a small random config) or ``path/to/file.py:FACTORY`` (a function returning the
model). Every argument that can be checked without the model (values, paths) is checked before the
model is built, so a bad one fails at once.

Exit status: 0 on success; 2 for bad usage (an option value, model spec, input shape or path that
cannot be used, also when the library rejects an option: ``InvalidOptionError``); 1 when the run
fails (tracing, verification, loading, the user's own model code). Errors go to stderr, starting with
``structprune:``; a message of several lines (a ``TraceError`` names every tracer's reason and a
hint) is printed whole, less third-party noise (torch.export's graph dumps and logging advice).
``--traceback`` adds the Python traceback, for bug reports.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
import tempfile
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, NoReturn, Optional, Tuple, cast

from ..errors import InvalidOptionError, StructPruneError
from ..graph.quiet import DUMP_START, without_graph_dumps

if TYPE_CHECKING:  # torch loads when a command runs, not for --help, --version or a usage error
    import torch
    from torch import nn

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
GRAPH_FORMATS = (".graphml", ".dot")  # what DependencyGraph.write writes
MAX_MESSAGE_LINES = 40  # a longer third-party message is cut here (--traceback shows all of it)
_HF_SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, n_embd=64, n_layer=2, n_head=4, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                 max_position_embeddings=128, n_positions=128, image_size=32, patch_size=8)


class UsageError(InvalidOptionError):
    """The command line cannot be used as given: an option value, model spec, input shape or path (exit 2)."""


SpecError = UsageError  # the name this error had when it covered model specs only


class UserCodeError(StructPruneError):
    """The user's own model file or factory failed: a syntax error, or an exception while it ran (exit 1)."""


# ---- argument values: each parser raises UsageError with what to pass instead ------------------------------------
def parse_shape(text: str) -> Tuple[int, ...]:
    """``1x3x224x224`` -> ``(1, 3, 224, 224)``: positive sizes only."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"must look like 1x3x224x224, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"must have positive sizes, got {text!r}")
    return shape


def parse_ratio(text: str) -> float:
    """A fraction removed, in [0, 1)."""
    try:
        from ..options import check_fraction

        return check_fraction("the ratio", float(text), example="0.5")
    except (ValueError, InvalidOptionError):
        raise UsageError(f"a ratio is a number in [0, 1) (the fraction of channels removed), got {text!r}") from None


def parse_ratio_list(text: str) -> List[float]:
    """``0,0.25,0.5`` -> ``[0.0, 0.25, 0.5]`` (bench's sweep)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise UsageError(f"takes comma-separated ratios such as 0,0.25,0.5; got {text!r}")
    return [parse_ratio(part) for part in parts]


def parse_layer_ratios(text: str) -> Dict[str, float]:
    """``'layer4.*=0.7,fc=0'`` -> ``{"layer4.*": 0.7, "fc": 0.0}`` (slim's per-layer overrides)."""
    pairs: Dict[str, float] = {}
    for item in text.split(","):
        pattern, sep, value = item.partition("=")
        try:
            if not sep or not pattern.strip():
                raise ValueError(item)
            pairs[pattern.strip()] = float(value)
        except ValueError:
            raise UsageError(f"takes PATTERN=RATIO[,PATTERN=RATIO...], e.g. 'layer4.*=0.7'; got {text!r}") from None
    from ..options import check_ratios

    try:
        return check_ratios(pairs)
    except InvalidOptionError as error:
        raise UsageError(str(error)) from None


def parse_names(text: str) -> List[str]:
    """``'fc,layer4.*'`` -> ``["fc", "layer4.*"]`` (module names or globs for --ignore)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UsageError(f"takes module names or globs, e.g. --ignore fc or --ignore 'layer4.*'; got {text!r}")
    return names


def parse_target(text: Optional[str]) -> Optional[Dict[str, float]]:
    """``latency=0.5`` -> ``{"latency": 0.5}`` (also ``params=`` and ``macs=``)."""
    if text is None:
        return None
    from ..options import TARGETS

    kind, _, value = text.partition("=")
    kind = kind.strip()
    try:
        fraction = float(value)
    except ValueError:
        fraction = None
    if kind not in TARGETS or fraction is None or not 0 <= fraction < 1:
        raise UsageError(f"takes KIND=FRACTION with KIND one of {', '.join(TARGETS)} and FRACTION in "
                         f"[0, 1), e.g. --target latency=0.5 or --target params=0.3; got {text!r}")
    return {kind: fraction}


def parse_round_to(text: str) -> Any:
    """``auto``, ``none`` or a positive integer."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"takes auto, none or a positive integer; got {text!r}")
    return int(text)


def parse_device(text: str) -> str:
    """A device torch knows and this machine has (``cuda`` without a GPU fails here, not after tracing)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"takes a torch device such as cpu, cuda or cuda:1; got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{text}: CUDA is not available on this machine")
    return text


# ---- paths: checked before any model is built ---------------------------------------------------------------
def _existing_ancestor(path: str) -> str:
    """The nearest part of ``path`` (itself or a parent) that exists."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        current = os.path.dirname(current)
    return current


def _require_writable_directory(directory: str, what: str) -> None:
    """Fail unless a file can really be created in ``directory`` (an access check would pass for root)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise UsageError(f"{what}: cannot write in {directory} ({error.strerror or error})") from None


def output_directory(text: str) -> str:
    """``--out``: a directory that exists or can be created, and where files can be written."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise UsageError(f"{text} is an existing file; pass a directory (created if missing) to hold "
                         f"model.safetensors and structprune.json")
    ancestor = _existing_ancestor(text)
    if not os.path.isdir(ancestor):
        raise UsageError(f"{text} cannot be created: {ancestor} is a file, not a directory")
    _require_writable_directory(ancestor, text)
    return text


def _require_writable_parent(path: str) -> None:
    """Fail unless the directory that would hold the file ``path`` exists and can be written in."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{path}: the directory {parent} does not exist")
    _require_writable_directory(parent, path)


def graph_file(text: str) -> str:
    """``--write``: a ``.graphml`` or ``.dot`` file in a writable directory."""
    if not text.endswith(GRAPH_FORMATS):
        raise UsageError(f"writes {' or '.join(GRAPH_FORMATS)} files, got {text!r}: "
                         f"pass e.g. graph.dot (view it with Graphviz: dot -Tpng graph.dot -o graph.png)")
    if os.path.isdir(text):
        raise UsageError(f"{text} is a directory; pass a file name")
    _require_writable_parent(text)
    return text


def export_file(text: str) -> str:
    """``export --out``: a new ``.pt2`` or ``.onnx`` file in a writable directory (an existing one is kept)."""
    from .export import EXPORT_FORMATS

    if not text.endswith(EXPORT_FORMATS):
        raise UsageError(f"writes {' or '.join(EXPORT_FORMATS)} files, got {text!r}: pass e.g. small.pt2 "
                         f"(torch.export) or small.onnx")
    if os.path.lexists(text):
        raise UsageError(f"{text} exists; remove it or pass another name (export never overwrites)")
    _require_writable_parent(text)
    return text


def saved_directory(text: str) -> str:
    """``load``'s directory: one that exists (what is in it is checked by ``structprune.load``)."""
    if not os.path.isdir(text):
        raise UsageError(f"{text} is not a directory; pass the directory that slim --out (or structprune.save) "
                         f"wrote")
    return text


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type``: its UsageError becomes argparse's error (exit 2, the option named)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__  # argparse names the type in some of its messages
    return convert


# ---- models -------------------------------------------------------------------------------------------------
def _import_zoo(name: str) -> Any:
    """An optional model zoo, or a UsageError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UsageError(f"{name}: models need {name} installed (pip install {name})") from None


def build_model(spec: str) -> Tuple[nn.Module, Optional[Tuple[int, ...]], str]:
    """``(model in eval mode, default input shape or None, kind of input)`` for a model spec."""
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise UsageError(f"model spec must be torchvision:NAME, timm:NAME, hf:CLASS or file.py:FACTORY, got {spec!r}")
    if source == "torchvision":
        torchvision = _import_zoo("torchvision")
        try:
            return torchvision.models.get_model(name, weights=None).eval(), (1, 3, 224, 224), "image"
        except ValueError as error:
            raise UsageError(f"torchvision has no model {name!r} ({error})") from None
    if source == "timm":
        timm = _import_zoo("timm")
        try:
            model = timm.create_model(name, pretrained=False).eval()
        except RuntimeError as error:
            raise UsageError(f"timm has no model {name!r} ({error})") from None
        pretrained_cfg = cast(Dict[str, Any], model.pretrained_cfg)  # a plain dict on every timm model
        return model, tuple([1] + list(pretrained_cfg.get("input_size", (3, 224, 224)))), "image"
    if source == "hf":
        return _hugging_face(name)
    if source.endswith(".py"):
        return _from_file(source, name), None, "image"
    raise UsageError(f"unknown model source {source!r}: use torchvision:, timm:, hf: or a .py file")


def _hugging_face(name: str) -> Tuple[nn.Module, Tuple[int, ...], str]:
    transformers = _import_zoo("transformers")
    cls = getattr(transformers, name, None)
    config_cls = getattr(cls, "config_class", None)
    if cls is None or config_cls is None:
        raise UsageError(f"transformers has no model class {name!r}")
    defaults = config_cls()
    # _HF_SMALL names the fields of several families (BERT, GPT-2, LLaMA, ViT): each config takes its own
    small = {k: v for k, v in _HF_SMALL.items() if hasattr(defaults, k)}
    model = cls(config_cls(**small)).eval()
    vision = hasattr(defaults, "image_size") and hasattr(defaults, "num_channels")
    return model, ((1, 3, small.get("image_size", 32), small.get("image_size", 32)) if vision else (1, 16)), \
        ("image" if vision else "tokens")


def _where(error: BaseException, path: str) -> str:
    """`` (at FILE, line N, in FUNC: CODE)`` for the innermost frame of ``error`` in the user's file."""
    if isinstance(error, SyntaxError) and error.lineno is not None:
        code = (error.text or "").strip()
        return f" (at {path}, line {error.lineno}{': ' + code if code else ''})"
    own = os.path.abspath(path)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == own]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at {path}, line {frame.lineno}, in {frame.name}: {(frame.line or '').strip()})"


def _user_failure(what: str, error: BaseException, path: str) -> UserCodeError:
    """A UserCodeError saying what failed, where in the user's file, and the exception's own message."""
    message = error.msg if isinstance(error, SyntaxError) else str(error)
    return UserCodeError(f"{what} failed: {type(error).__name__}: {message}{_where(error, path)}")


def _import_file(path: str) -> Any:
    """The user's file as a module; its directory is importable while it runs, as for ``python file.py``."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # no loader for this kind of file
        raise UsageError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)  # the user's own code, named on the command line
    except Exception as error:  # SyntaxError, ImportError, or anything the file raises at import
        raise _user_failure(f"importing {path}", error, path) from error
    finally:
        sys.path.remove(folder)
    return module


def _require_no_arguments(build: Callable[..., Any], spec: str) -> None:
    """A factory the command line can call: ``FACTORY()``, without arguments."""
    try:
        signature = inspect.signature(build)
    except (TypeError, ValueError):  # a builtin or C function: calling it will tell
        return
    needed = [p.name for p in signature.parameters.values() if p.default is p.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if needed:
        raise UsageError(f"{spec} needs arguments ({', '.join(needed)}), but the command line calls it with none: "
                         f"give them defaults, or add a function without parameters that calls it")


def _from_file(path: str, factory: str) -> nn.Module:
    from torch import nn

    spec = f"{path}:{factory}"
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    module = _import_file(path)
    build = getattr(module, factory, None)
    if not callable(build):
        own = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__)
        raise UsageError(f"{path} has no function {factory!r}" + (f"; it defines {', '.join(own)}" if own else ""))
    _require_no_arguments(build, spec)
    try:
        model = build()
    except Exception as error:
        raise _user_failure(f"{spec}()", error, path) from error
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def example_input(shape: Optional[Tuple[int, ...]], kind: str, model: nn.Module) -> torch.Tensor:
    import torch

    if shape is None:
        raise UsageError("this model needs --input (e.g. --input 1x3x64x64)")
    if kind == "tokens":
        vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
        return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _load(args: argparse.Namespace) -> Tuple[nn.Module, torch.Tensor]:
    """The model named on the command line and its example input, on ``--device`` in ``--dtype``."""
    import torch

    model, default, kind = build_model(args.model)
    x = example_input(args.input or default, kind, model)
    device, dtype = getattr(args, "device", None), getattr(args, "dtype", None)
    if device or dtype:
        model = model.to(device=device, dtype=getattr(torch, dtype) if dtype else None)
        x = x.to(device=device, dtype=getattr(torch, dtype) if dtype and x.is_floating_point() else None)
    return model, x


# ---- commands ---------------------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    import structprune as sp

    model, x = _load(args)
    graph = sp.DependencyGraph(model, x)
    print(graph.summary(limit=args.limit))
    if args.write:
        graph.write(args.write)
        print(f"graph written to {args.write}")
    return EXIT_OK


def slim_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword options of ``structprune.slim`` that the command line sets."""
    options: Dict[str, Any] = dict(criterion=args.criterion, scope=args.scope, target=args.target,
                                   round_to=args.round_to, verify=not args.no_verify)
    if args.ignore:
        options["ignore"] = [name for names in args.ignore for name in names]
    if args.ratios:
        options["ratios"] = {pattern: r for mapping in args.ratios for pattern, r in mapping.items()}
    return options


def cmd_slim(args: argparse.Namespace) -> int:
    import structprune as sp

    model, x = _load(args)
    small, slim_report = sp.slim_with_report(model, x, args.ratio, **slim_options(args))
    print(slim_report)
    print(sp.report(model, small, x, latency=not args.no_latency))
    if args.out:
        sp.save(small, args.out)
        print(f"saved to {args.out} (model.safetensors + structprune.json; reload with "
              f"structprune load {args.out} --model {args.model}, or structprune.load)")
    return EXIT_OK


def cmd_load(args: argparse.Namespace) -> int:
    import structprune as sp

    model, x = _load(args)
    loaded = sp.load(args.directory, copy.deepcopy(model))  # a copy: the fresh model stays the "before"
    print(f"loaded {args.directory} into {args.model}")
    print(sp.report(model, loaded, x, latency=not args.no_latency))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    import structprune as sp

    from .export import export_model

    model, x = _load(args)
    loaded = sp.load(args.directory, model)
    description = export_model(loaded, x, args.out)
    print(f"exported {args.directory} ({args.model}) to {args.out}: {description}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    import structprune as sp

    from ..tools.metrics import count_macs, count_parameters, latency_ms
    from ..tools.progress import progress_bar

    model, x = _load(args)
    ratios = args.ratios
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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    demo_main([])
    return EXIT_OK


# ---- the parser ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors read like every other error: ``structprune: ...``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"structprune: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from .. import __version__

    return f"structprune {__version__} (torch {_installed_version('torch')})"


def _installed_version(package: str) -> str:
    """The installed version of ``package``, read from its metadata (importing torch takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# the built-in criteria, named in --help without importing torch; tests/test_startup.py checks them against
# structprune.list_criteria(), and --criterion accepts any registered name
BUILT_IN_CRITERIA = ("bn_scale", "flap", "fpgm", "gradient", "l1", "l2", "magnitude", "random", "taylor", "wanda")


def parse_criterion(text: str) -> str:
    """A registered criterion name (``structprune.list_criteria()``)."""
    from ..scoring import list_criteria

    names = list_criteria()
    if text not in names:
        raise UsageError(f"no criterion {text!r}; choose one of {', '.join(names)}")
    return text


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="structprune", description="Structured pruning of PyTorch models.",
                  epilog="model specs: torchvision:NAME, timm:NAME, hf:CLASS (small random config), "
                         "path/to/file.py:FACTORY. Exit status 0 ok, 1 the run failed, 2 bad usage.")
    top.add_argument("--version", action="version", version=_version())
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="on failure, also print the Python traceback")
    shape = _argument(parse_shape)

    def model_command(name: str, help_text: str, positional_model: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if positional_model:
            p.add_argument("model", help="torchvision:NAME, timm:NAME, hf:CLASS or path/to/file.py:FACTORY")
        p.add_argument("--input", type=shape, metavar="SHAPE",
                       help="example input shape, e.g. 1x3x224x224 (token ids for hf: text models)")
        return p

    p = model_command("inspect", "show the coupled channel groups of a model")
    p.add_argument("--limit", type=int, default=40, help="rows of the group table (default 40)")
    p.add_argument("--write", metavar="FILE", type=_argument(graph_file),
                   help=f"also write the graph ({' or '.join(GRAPH_FORMATS)})")
    p.set_defaults(run=cmd_inspect)

    p = model_command("slim", "prune a model and print what changed")
    p.add_argument("--ratio", type=_argument(parse_ratio), default=0.5,
                   help="fraction of channels removed per layer, in [0, 1) (default 0.5)")
    p.add_argument("--criterion", default="l2", type=_argument(parse_criterion), metavar="NAME",
                   help=f"channel importance: {', '.join(BUILT_IN_CRITERIA)} (default l2)")
    p.add_argument("--scope", default="local", choices=["local", "global"],
                   help="local (default): the ratio of every layer; global: of the whole model, least important "
                        "first")
    p.add_argument("--target", metavar="KIND=F", type=_argument(parse_target),
                   help="remove a fraction of params, macs or the measured latency instead of a ratio, "
                        "e.g. latency=0.5")
    p.add_argument("--round-to", default="auto", metavar="N", type=_argument(parse_round_to),
                   help="keep widths multiples of N; auto (default): what the device runs well; none: exact")
    p.add_argument("--ignore", metavar="NAMES", action="append", type=_argument(parse_names),
                   help="modules kept whole: names or globs, comma-separated or repeated (a parent covers its "
                        "children), e.g. --ignore fc --ignore 'layer4.*'")
    p.add_argument("--ratios", metavar="PATTERN=R", action="append", type=_argument(parse_layer_ratios),
                   help="per-layer ratio overrides, comma-separated or repeated, e.g. --ratios 'layer4.*=0.7,fc=0'")
    p.add_argument("--device", type=_argument(parse_device), help="run (and time) the model on this device, e.g. "
                                                                  "cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert the model to this dtype")
    p.add_argument("--out", metavar="DIR", type=_argument(output_directory),
                   help="save the pruned model here (safetensors + JSON plan; checked before pruning)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the original")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.set_defaults(run=cmd_slim)

    p = model_command("load", "reload a model saved by slim --out and compare it with the unpruned one",
                      positional_model=False)
    p.add_argument("directory", metavar="DIR", type=_argument(saved_directory), help="what slim --out wrote")
    p.add_argument("--model", required=True, help="the unpruned architecture: torchvision:NAME, timm:NAME, "
                                                  "hf:CLASS or path/to/file.py:FACTORY")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.set_defaults(run=cmd_load)

    p = model_command("export", "write a model saved by slim --out as a torch.export program (.pt2) or ONNX file, "
                                "checked against the eager model", positional_model=False)
    p.add_argument("directory", metavar="DIR", type=_argument(saved_directory), help="what slim --out wrote")
    p.add_argument("--model", required=True, help="the unpruned architecture: torchvision:NAME, timm:NAME, "
                                                  "hf:CLASS or path/to/file.py:FACTORY")
    p.add_argument("--out", required=True, metavar="FILE", type=_argument(export_file),
                   help="the file to write: FILE.pt2 (torch.export.save) or FILE.onnx (a new file)")
    p.set_defaults(run=cmd_export)

    p = model_command("bench", "parameters, MACs and CPU latency at several ratios")
    p.add_argument("--ratios", type=_argument(parse_ratio_list), default=[0.0, 0.25, 0.5],
                   help="comma-separated ratios (default 0,0.25,0.5)")
    p.add_argument("--criterion", default="l2", type=_argument(parse_criterion), metavar="NAME",
                   help="channel importance (default l2)")
    p.set_defaults(run=cmd_bench)

    from . import llm
    llm.add_parser(sub, common, _argument, sys.modules[__name__])

    p = sub.add_parser("demo", help="prune the built-in example and print the before/after report", parents=[common])
    p.set_defaults(run=cmd_demo)
    return top


# ---- errors -------------------------------------------------------------------------------------------------
# third-party advice that is noise in a structprune message (torch.export's guard errors, dynamo's and fx's tips)
_NOISE = re.compile(r"TORCH_LOGS|TORCHDYNAMO_|docs\.google\.com|^\s*Caused by: \(|^\s*Set TORCH\w*=|"
                    r"^\s*consider using data-dependent friendly APIs|^While executing %|^Use tlparse")


def _in_dump_body(line: str) -> bool:
    """A line that continues a dump: indented code, a traceback's ``File`` line, blank, or fx's ``None``."""
    return not line.strip() or line.startswith(("    ", "\t", '  File "')) or line.strip() == "None"


def clean_message(text: str) -> List[str]:
    """The lines of an error message without third-party noise: dumps (from their first line through
    their indented body) and torch's logging advice; runs of blank lines become one."""
    lines: List[str] = []
    in_dump = False
    for line in text.strip().splitlines():
        if DUMP_START.match(line):
            in_dump = True
            continue
        if in_dump and _in_dump_body(line):
            continue
        in_dump = False
        if _NOISE.search(line) or (not line.strip() and (not lines or not lines[-1].strip())):
            continue
        lines.append(line.rstrip())
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def exit_status(error: BaseException) -> int:
    """2 for an option, spec or path the run cannot use (ours or the library's), 1 for any other failure."""
    return EXIT_USAGE if isinstance(error, InvalidOptionError) else EXIT_FAILED


def format_error(error: BaseException) -> str:
    """``structprune: [Type: ]message``, every line of it, less noise. Our own usage and user-code errors
    need no type name; an error structprune did not raise itself ends with how to see where it came from."""
    lines = clean_message(str(error)) or [""]
    if len(lines) > MAX_MESSAGE_LINES:
        lines = lines[:MAX_MESSAGE_LINES] + [f"... ({len(lines) - MAX_MESSAGE_LINES} more lines)"]
    named = "" if isinstance(error, (UsageError, UserCodeError)) else f"{type(error).__name__}: "
    text = "\n".join([f"structprune: {named}{lines[0]}"] + lines[1:])
    if not isinstance(error, StructPruneError):
        text += "\n(add --traceback to see where it was raised)"
    return text


_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Within the block, torch.export's and dynamo's warnings are off and the graphs torch.export prints to
    stderr are dropped: structprune's fallback from torch.fx makes them routine, and their errors still
    reach the message. Logger levels are restored after (``main`` may run inside a larger program)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with without_graph_dumps():
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _exit_code(done: SystemExit) -> int:
    """argparse's SystemExit (--help, --version, a usage error) as an exit status."""
    return done.code if isinstance(done.code, int) else (EXIT_OK if done.code is None else EXIT_FAILED)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status, never raise."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as done:  # argparse has printed the help, the version or the usage error
        return _exit_code(done)
    try:
        with contextlib.nullcontext() if args.traceback else _quiet_torch():
            return args.run(args)
    except KeyboardInterrupt:
        print("structprune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.traceback:
            traceback.print_exc()
        print(format_error(error), file=sys.stderr)
        return exit_status(error)


if __name__ == "__main__":
    sys.exit(main())
