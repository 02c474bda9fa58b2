"""``structprune llm``: prune a Hugging Face checkpoint folder into another, one decoder layer at a time.

The calibration text is tokenized with the checkpoint's own tokenizer and cut into ``--samples``
sequences of ``--seq-len`` tokens; everything else is :func:`structprune.prune_pretrained`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, List

from ..errors import InvalidOptionError

ACTIVATION_CRITERIA = ("flap", "wanda")


def add_parser(sub: Any, common: argparse.ArgumentParser, argument: Any, parsers: Any) -> None:
    """The ``llm`` subcommand; ``argument`` wraps a parse function for argparse, ``parsers`` holds them."""
    p = sub.add_parser("llm", parents=[common], help="prune a Hugging Face LLM folder layer by layer into a new folder "
                       "(bounded memory: one decoder layer at a time)",
                       description="Prune a Hugging Face causal LM folder (config.json, safetensors, tokenizer) into "
                                   "a new folder that from_pretrained loads, never holding the model in memory.")
    p.add_argument("source", metavar="SRC", help="the Hugging Face model folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist)")
    p.add_argument("--target", metavar="KIND=F", type=argument(parsers.parse_target),
                   help="remove a fraction of params or macs, e.g. params=0.2 (else --ratio)")
    p.add_argument("--ratio", type=argument(parsers.parse_ratio), default=0.2,
                   help="fraction of heads and feed-forward channels removed per layer (default 0.2)")
    p.add_argument("--criterion", default="flap", type=argument(parsers.parse_criterion), metavar="NAME",
                   help="channel importance (default flap; flap and wanda need --data)")
    p.add_argument("--data", metavar="FILE", action="append", default=[],
                   help="calibration text file(s), tokenized with the folder's tokenizer")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per calibration batch (default 4)")
    p.add_argument("--hidden", action="store_true", help="also prune the residual width (reloads less often, "
                                                         "loses more quality)")
    p.add_argument("--no-compensate", action="store_true", help="no bias compensation of removed channels")
    p.add_argument("--ignore", metavar="NAMES", action="append", type=argument(parsers.parse_names),
                   help="modules kept whole: names or globs, comma-separated or repeated")
    p.add_argument("--device", default="cpu", type=argument(parsers.parse_device),
                   help="where each layer computes (default cpu; cuda on a GPU)")
    p.add_argument("--no-verify", action="store_true", help="skip the layer-by-layer verification")
    p.set_defaults(run=cmd_llm)


def calibration_batches(source: str, files: List[str], samples: int, length: int, batch_size: int) -> List[Any]:
    """``samples`` sequences of ``length`` token ids from ``files``, tokenized by the folder's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    for value, name in ((samples, "--samples"), (length, "--seq-len"), (batch_size, "--batch-size")):
        if value < 1:
            raise InvalidOptionError(f"{name} must be a positive number, got {value}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise InvalidOptionError(f"--data needs the folder's tokenizer, and {source} has none transformers can "
                                 f"load ({str(error).strip().splitlines()[0][:200]})") from error
    text = "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    needed = samples * length
    if ids.numel() < needed:
        raise InvalidOptionError(f"the calibration text has {ids.numel()} tokens; {samples} x {length} = {needed} "
                                 f"are needed: pass more text, or fewer --samples or a shorter --seq-len")
    sequences = ids[:needed].reshape(samples, length)
    return list(torch.split(sequences, batch_size))


def cmd_llm(args: argparse.Namespace) -> int:
    from ..layerwise.pretrained import prune_pretrained

    for file in args.data:
        if not Path(file).is_file():
            raise InvalidOptionError(f"--data {file}: no such file")
    if not args.data and args.criterion in ACTIVATION_CRITERIA:
        raise InvalidOptionError(f"--criterion {args.criterion} scores channels by their activations: pass "
                                 f"calibration text with --data FILE (or --criterion l2, which reads weights only)")
    data = calibration_batches(args.source, args.data, args.samples, args.seq_len, args.batch_size) \
        if args.data else None
    options: dict = dict(criterion=args.criterion, hidden=args.hidden, verify=not args.no_verify)
    if args.target:
        options["target"] = args.target
    if args.no_compensate:
        options["compensate"] = False
    if args.ignore:
        options["ignore"] = [name for names in args.ignore for name in names]
    report = prune_pretrained(args.source, args.out, args.ratio, data=data, device=args.device, **options)
    print(report)
    return 0
