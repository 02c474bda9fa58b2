"""Saving and loading pruned models without pickle.

A saved model is a directory with two files, and a third where the model has them:

* ``model.safetensors``: every parameter and buffer (``safetensors.torch.save_model``, which also
  handles tied weights such as a language model head sharing the embedding);
* ``buffers.safetensors``: the non-persistent buffers (``state_dict`` leaves them out, but pruning
  may have sliced them: the rotary frequencies ``inv_freq`` of a model pruned in head dims);
* ``structprune.json``: a versioned plan of the pruned shapes: the shape of every tensor, the size
  attributes of every module (``out_channels``, ``num_heads``...), a Hugging Face config's
  numeric fields, the SHA-256 of each weights file and of the plan itself.

:func:`load` builds a fresh, unpruned model from the caller's own code (a factory or an instance)
and treats everything it reads as untrusted data:

1. the plan and the weights files are read and checked first: JSON parsed as data (nothing is
   executed, there is no pickle), content hashes compared, every shape no larger than the fresh
   model's (so no file can make it allocate more than the model it replaces), every attribute of
   the right type, only size attributes that pruning shrinks may differ from the fresh model's,
   and those must agree with the tensor shapes (the op registry's updaters derive them);
2. the new tensors, attributes and config copies are built aside, into objects load owns;
3. only then are they swapped into the model, in one step.

So a failed load changes nothing: the caller's model instance and the config object its factory
shares with the caller's original model stay exactly as they were. A successful load leaves the
caller's config objects alone too: the loaded model gets its own deep copies.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union, cast

import torch
from torch import nn

from ..errors import InvalidOptionError, LoadError
from ..options import require_module

FORMAT = "structprune"
VERSION = 2  # 2: content hashes of the plan and of the weights files
PLAN_FILE = "structprune.json"
WEIGHTS_FILE = "model.safetensors"
BUFFERS_FILE = "buffers.safetensors"
DIGEST_KEY = "sha256"
MAX_PLAN_BYTES = 256 * 2 ** 20  # a plan lists shapes and attributes: even for the largest models, a few MB
_PLAIN = (int, float, bool, str, type(None))
_CHUNK = 2 ** 22

PathLike = Union[str, "os.PathLike[str]"]


# ---- what is saved ---------------------------------------------------------------------------------------
def _plain(value: Any) -> bool:
    """Plain data: a number, bool, string or None, or a list/tuple of those."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def _attributes(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Plain (int, float, bool, str, None, tuples of those) attributes of every module."""
    found = {}
    for path, module in model.named_modules():
        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(module).items()
                  if not k.startswith("_") and k != "training" and _plain(v)}
        if values:
            found[path] = values
    return found


def _is_config(value: Any) -> bool:
    """A model configuration object (Hugging Face ``PretrainedConfig`` or alike): not a module, has fields."""
    return value is not None and not isinstance(value, nn.Module) and hasattr(value, "__dict__")


def _numeric_field(value: Any) -> bool:
    return isinstance(value, (int, float, bool))


def _config_fields(model: nn.Module) -> Dict[str, Any]:
    """The numeric public fields of ``model.config`` (the sizes pruning rewrites are among them)."""
    config = getattr(model, "config", None)
    if not _is_config(config):
        return {}
    return {k: v for k, v in vars(config).items() if not k.startswith("_") and _numeric_field(v)}


def _non_persistent_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Fully-qualified name -> tensor of every buffer ``state_dict`` leaves out."""
    found = {}
    for path, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            t = module._buffers.get(name)
            if isinstance(t, torch.Tensor):
                found[f"{path}.{name}" if path else name] = t
    return found


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shapes(tensors: Dict[str, torch.Tensor]) -> Dict[str, dict]:
    return {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in tensors.items()}


# ---- hashes ----------------------------------------------------------------------------------------------
def plan_digest(plan: Dict[str, Any]) -> str:
    """SHA-256 of ``plan`` without its own ``"sha256"`` entry, over canonical JSON (sorted keys, no
    spaces): the value :func:`save` stores in the plan and :func:`load` recomputes. A tool that
    edits a plan on purpose must store the new digest (``plan["sha256"] = plan_digest(plan)``)."""
    body = {k: v for k, v in plan.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def file_digest(path: PathLike) -> Tuple[str, int]:
    """``(sha256 hex digest, size in bytes)`` of a file, read in chunks (a weights file may be large)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# ---- save ------------------------------------------------------------------------------------------------
def new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask): safetensors writes its files
    with 0o600, which hides a saved model from the group and the other users the umask allows."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing the process-wide umask
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _check_directory(directory: PathLike) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InvalidOptionError(f"{directory} is a file; save writes a directory ({WEIGHTS_FILE} + {PLAN_FILE}): "
                                 f"pass a new or existing directory path")


def _write_buffers(buffers: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    # clones: safetensors refuses tensors that share memory, and a buffer may be a view
    save_file({name: t.detach().cpu().contiguous().clone() for name, t in buffers.items()}, path)


def save(model: nn.Module, directory: PathLike) -> None:
    """Write ``model`` (typically pruned) to ``directory`` as safetensors weights plus a JSON plan
    that records the shapes, the size attributes and the content hashes :func:`load` checks."""
    require_module(model)
    _check_directory(directory)
    os.makedirs(directory, exist_ok=True)
    plan = _plan_of(model)
    mode = new_file_mode()
    written = _write_weights(model, directory)
    for path in written.values():
        os.chmod(path, mode)
    plan["files"] = {name: dict(zip((DIGEST_KEY, "size"), file_digest(path))) for name, path in written.items()}
    plan[DIGEST_KEY] = plan_digest(plan)
    plan_path = os.path.join(directory, PLAN_FILE)
    with open(plan_path, "w", encoding="utf-8") as f:  # last: a save cut short leaves hashes that do not match
        json.dump(plan, f, indent=1, sort_keys=True)
    os.chmod(plan_path, mode)  # a plan left by an earlier save would keep its old mode


def _plan_of(model: nn.Module) -> Dict[str, Any]:
    """The plan of ``model`` without the file hashes: shapes, attributes, config fields."""
    state = model.state_dict(keep_vars=True)
    plan: Dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "tensors": _shapes({name: t for name, t in state.items() if isinstance(t, torch.Tensor)}),
        "attributes": _attributes(model),
        "config": _config_fields(model),
    }
    buffers = _non_persistent_buffers(model)
    if buffers:
        plan["buffers"] = _shapes(buffers)
    return plan


def _write_weights(model: nn.Module, directory: PathLike) -> Dict[str, str]:
    """Write the weights (and the non-persistent buffers, where the model has some); file name -> path."""
    from safetensors.torch import save_model

    written = {WEIGHTS_FILE: os.path.join(directory, WEIGHTS_FILE)}
    save_model(model, written[WEIGHTS_FILE])
    buffers = _non_persistent_buffers(model)
    buffers_path = os.path.join(directory, BUFFERS_FILE)
    if buffers:
        written[BUFFERS_FILE] = buffers_path
        _write_buffers(buffers, buffers_path)
    elif os.path.isfile(buffers_path):
        os.remove(buffers_path)  # left by an earlier save into this directory: it no longer belongs here
    return written


# ---- load: the steps -------------------------------------------------------------------------------------
@dataclass
class _Staged:
    """Everything a load changes, built aside: nothing of it is in the target model yet."""

    slots: List[Tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list)  # (owner, name, old tensor)
    tensors: Dict[int, torch.Tensor] = field(default_factory=dict)  # id(old tensor) -> its replacement
    attributes: List[Tuple[nn.Module, str, Any]] = field(default_factory=list)
    configs: List[Tuple[nn.Module, Any]] = field(default_factory=list)  # (module, its own config copy)


def load(directory: PathLike, model: Union[nn.Module, Callable[[], nn.Module]]) -> nn.Module:
    """Rebuild a model saved by :func:`save`. ``model`` is an unpruned instance of the same
    architecture or a function (called with no arguments) that builds one.

    The files are checked against their hashes and against the fresh model before anything
    changes; the new tensors, attributes and config copies are then swapped in at once and the
    model is returned (an instance passed in is modified in place). Any problem raises
    :class:`~structprune.errors.LoadError` and leaves the instance, and any config object shared
    with the caller, untouched.
    """
    if not (callable(model) or isinstance(model, nn.Module)):  # the cheap check before any file is read
        raise LoadError(f"load needs an nn.Module or a function returning one, got {type(model).__name__}")
    plan = _read_plan(directory)
    _verify_files(directory, plan)
    target = _build_target(model)
    staged = _stage(directory, plan, target)
    _swap(staged)
    return target


def _build_target(model: Union[nn.Module, Callable[[], nn.Module]]) -> nn.Module:
    """The fresh model: ``model`` itself, or what the factory returns (its failures become a LoadError)."""
    if isinstance(model, nn.Module):
        return model
    name = getattr(model, "__qualname__", type(model).__name__)
    try:
        target = model()
    except Exception as error:  # the caller's code: any error it raises is a failed build
        hint = " (load calls it with no arguments: wrap it, e.g. lambda: build(cfg))" \
            if isinstance(error, TypeError) and "argument" in str(error) else ""
        raise LoadError(f"the model factory {name} raised {type(error).__name__}: {_first_line(error)}{hint}; "
                        f"pass a function that builds the fresh, unpruned model") from error
    if not isinstance(target, nn.Module):
        raise LoadError(f"the model factory {name} returned a {type(target).__name__}, not an nn.Module; "
                        f"load needs a function that returns the fresh, unpruned model")
    return target


def _first_line(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else ""


# ---- load: the plan --------------------------------------------------------------------------------------
def _no_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """A JSON object hook: a key given twice would make the file mean two things."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the key {duplicate!r} appears twice in one object")
    return dict(pairs)


def _parse_json(path: str) -> Any:
    size = os.path.getsize(path)
    if size > MAX_PLAN_BYTES:
        raise LoadError(f"{path} is {size} bytes; a structprune plan is at most {MAX_PLAN_BYTES} "
                        f"(shapes and attributes only): this is not a plan written by sp.save")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise LoadError(f"{path} is not valid JSON ({_first_line(error)}); the file is damaged or not a "
                        f"structprune plan") from None


def _read_plan(directory: PathLike) -> Dict[str, Any]:
    """The parsed plan, its format, version, own hash and structure checked."""
    path = os.path.join(directory, PLAN_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        raise LoadError(f"{directory} is not a saved structprune model: it needs {PLAN_FILE} and {WEIGHTS_FILE}")
    plan = _parse_json(path)
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise LoadError(f"{path} is not a structprune plan (no 'format': '{FORMAT}' entry)")
    version = plan.get("version")
    if not (_is_int(version) and version == VERSION):
        older = " (version 1 files carry no content hashes: load them with the structprune that wrote them " \
                "and save again)" if version == 1 else ""
        raise LoadError(f"{path} has plan version {version!r}; this structprune reads version {VERSION}{older}")
    stored = plan.get(DIGEST_KEY)
    if not isinstance(stored, str) or stored != plan_digest(plan):
        raise LoadError(f"{path} does not match its own content hash ('{DIGEST_KEY}'): the plan was edited or "
                        f"damaged after sp.save wrote it; save the model again")
    _check_plan_structure(plan, path)
    return plan


def _check_plan_structure(plan: Dict[str, Any], path: str) -> None:
    """Every entry of the plan has the JSON type load expects (lists and strings where objects belong
    are refused here, before any of it is used)."""
    for key, required in (("tensors", True), ("attributes", True), ("config", False), ("buffers", False),
                          ("files", True)):
        if required and key not in plan:
            raise LoadError(f"{path}: the '{key}' entry is missing; the plan is incomplete")
        if not isinstance(plan.get(key, {}), dict):
            raise LoadError(f"{path}: '{key}' must be a JSON object, got {type(plan[key]).__name__}")
    if not isinstance(plan.get("model_class"), str):
        raise LoadError(f"{path}: 'model_class' must be a string naming the saved model's class")
    for key in ("tensors", "buffers"):
        for name, entry in plan.get(key, {}).items():
            _check_tensor_entry(f"{key}[{name!r}]", entry, path)
    for module_path, values in plan["attributes"].items():
        if not isinstance(values, dict):
            raise LoadError(f"{path}: the attributes of module {module_path!r} must be a JSON object, "
                            f"got {type(values).__name__}")


def _check_tensor_entry(where: str, entry: Any, path: str) -> None:
    if not isinstance(entry, dict):
        raise LoadError(f"{path}: {where} must be an object with 'shape' and 'dtype', got {type(entry).__name__}")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
        raise LoadError(f"{path}: {where} has an invalid shape {shape!r}: a shape is a list of non-negative integers")
    if _dtype(entry.get("dtype")) is None:
        raise LoadError(f"{path}: {where} has an invalid dtype {entry.get('dtype')!r}: a torch dtype name such as "
                        f"'float32' was expected")


def _is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is an ``int`` in Python, never a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype(name: Any) -> Optional[torch.dtype]:
    """The torch dtype a plan names (None: not a dtype name; nothing else of ``torch`` is reachable)."""
    if not isinstance(name, str) or not name.isidentifier():
        return None
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


# ---- load: the files -------------------------------------------------------------------------------------
def _expected_files(plan: Dict[str, Any]) -> Set[str]:
    return {WEIGHTS_FILE, BUFFERS_FILE} if plan.get("buffers") else {WEIGHTS_FILE}


def _verify_files(directory: PathLike, plan: Dict[str, Any]) -> None:
    """Each weights file the plan lists exists, has the recorded size and SHA-256 (only the two
    known file names are accepted: a plan cannot point load at any other path)."""
    files = plan["files"]
    expected = _expected_files(plan)
    if set(files) != expected:
        raise LoadError(f"the plan lists the files {sorted(files)}, expected {sorted(expected)}; the plan is damaged")
    for name in sorted(expected):
        entry, path = files[name], os.path.join(directory, name)
        if not (isinstance(entry, dict) and isinstance(entry.get(DIGEST_KEY), str) and _is_int(entry.get("size"))):
            raise LoadError(f"the plan's entry for {name} must be an object with '{DIGEST_KEY}' and 'size'")
        if not os.path.isfile(path):
            raise LoadError(f"{path} is missing; copy the whole directory sp.save wrote")
        size = os.path.getsize(path)  # before hashing: a file of the wrong size is not even read
        if size != entry["size"]:
            raise LoadError(f"{path} has {size} bytes, the plan recorded {entry['size']}: the file is truncated, "
                            f"damaged or from another save; copy it again or save the model again")
        if file_digest(path)[0] != entry[DIGEST_KEY]:
            raise LoadError(f"{path} does not match the content hash in {PLAN_FILE}: the file is truncated, damaged "
                            f"or from another save; copy it again or save the model again")


def _open_safetensors(path: str) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as error:  # safetensors' own SafetensorError, or OSError
        raise LoadError(f"{path} is not a readable safetensors file ({type(error).__name__}: {_first_line(error)}); "
                        f"the file is truncated or damaged") from None


def _read_tensors(path: str, wanted: Dict[str, Tuple[List[int], torch.dtype]], groups: List[List[str]],
                  convert: Callable[[str, torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """group's first name -> ``convert(name, tensor)`` of one tensor per group of tied names, read from
    the safetensors file at ``path``. Each group needs at least one of its names in the file, every
    name in the file must be wanted, and a tensor's header shape is compared with the plan before
    its data is read (nothing larger than the plan, itself no larger than the fresh model, is ever
    allocated). ``convert`` copies while the file is open: what it reads is memory-mapped."""
    with _open_safetensors(path) as f:
        stored = set(f.keys())
        unknown = sorted(stored - set(wanted))
        if unknown:
            raise LoadError(f"{path} holds {len(unknown)} tensors the plan does not list (e.g. {unknown[:3]}); "
                            f"the file is from another model or was edited")
        found = {}
        for group in groups:
            present = [name for name in group if name in stored]
            if not present:
                raise LoadError(f"{path} lacks the tensor {group[0]!r} the plan lists; the file is from another "
                                f"model or was edited")
            tensors = [_read_one(f, name, *wanted[name], path) for name in present]
            if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
                raise LoadError(f"{path}: {present} are one tied tensor in the fresh model but differ in the file; "
                                f"build the fresh model with the same weight tying as the saved one")
            found[group[0]] = convert(group[0], tensors[0])
        return found


def _read_one(f: Any, name: str, shape: List[int], dtype: torch.dtype, path: str) -> torch.Tensor:
    try:
        header = f.get_slice(name).get_shape()
        if list(header) != shape:
            raise LoadError(f"{path}: tensor {name!r} has shape {tuple(header)} in the file, {tuple(shape)} in "
                            f"the plan; the files are from different saves or were edited")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer on a read-only map warns; the data is copied below
            tensor = f.get_tensor(name)
    except LoadError:
        raise
    except Exception as error:  # SafetensorError for a damaged entry
        raise LoadError(f"{path}: tensor {name!r} could not be read ({type(error).__name__}: "
                        f"{_first_line(error)}); the file is damaged") from None
    if tensor.dtype != dtype:
        raise LoadError(f"{path}: tensor {name!r} is {_dtype_name(tensor.dtype)} in the file, "
                        f"{_dtype_name(dtype)} in the plan; the files are from different saves or were edited")
    return tensor


# ---- load: staging ---------------------------------------------------------------------------------------
def _tensor_slots(model: nn.Module) -> Dict[str, Tuple[nn.Module, str, torch.Tensor]]:
    """Fully-qualified name -> (owner module, slot name, tensor) of every parameter and buffer, under
    every path a shared module is reachable by (as ``state_dict`` names them)."""
    slots = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for kind in (module._parameters, module._buffers):
            for name, t in kind.items():
                if t is not None:
                    slots[f"{path}.{name}" if path else name] = (module, name, t)
    return slots


def _stage(directory: PathLike, plan: Dict[str, Any], target: nn.Module) -> _Staged:
    """Check the plan against the fresh ``target`` and build every change aside: first the cheap
    checks of names, shapes, attributes and config fields, then the tensor data."""
    _check_class(plan, target)
    slots = _tensor_slots(target)
    entries = _tensor_entries(plan, target, slots)
    layout = _layout(slots, {name: tuple(shape) for name, (shape, _) in entries.items()})
    staged = _Staged()
    _stage_attributes(plan["attributes"], target, layout, staged)
    _stage_configs(plan.get("config", {}), target, "" in layout.pruned, staged)
    _stage_tensors(directory, plan, entries, slots, staged)
    return staged


def _check_class(plan: Dict[str, Any], target: nn.Module) -> None:
    saved = plan["model_class"].rpartition(".")[2]
    built = type(target).__qualname__.rpartition(".")[2]
    if saved != built:
        raise LoadError(f"the saved model is a {saved}, the fresh model a {built}; build the same architecture the "
                        f"pruned model came from")


def _tensor_entries(plan: Dict[str, Any], target: nn.Module,
                    slots: Dict[str, Tuple[nn.Module, str, torch.Tensor]]) -> Dict[str, Tuple[List[int], torch.dtype]]:
    """name -> (saved shape, saved dtype) of every tensor the plan lists, persistent and not, each
    checked against the fresh model: it exists, has as many dims, is no larger, has a compatible dtype."""
    state = {k for k, v in target.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    tensors, buffers = plan["tensors"], plan.get("buffers", {})
    missing, extra = sorted(state - set(tensors)), sorted(set(tensors) - state)
    if missing or extra:
        raise LoadError(f"the saved plan does not match this model: {len(missing)} tensors missing from the file "
                        f"(e.g. {missing[:3]}), {len(extra)} unknown to the model (e.g. {extra[:3]}); build the "
                        f"same architecture the pruned model came from")
    non_persistent = set(_non_persistent_buffers(target))
    for name in buffers:
        if name not in non_persistent:
            raise LoadError(f"the saved plan names a non-persistent buffer {name!r} this model does not have; "
                            f"build the same architecture the pruned model came from")
    entries = {}
    for name, entry in list(tensors.items()) + list(buffers.items()):
        if name not in slots:
            raise LoadError(f"tensor {name!r} of this model's state_dict is not a parameter or buffer of a module; "
                            f"load rebuilds plain parameters and buffers only")
        fresh = slots[name][2]
        # _check_tensor_entry already refused every entry whose dtype names no torch dtype
        shape, dtype = entry["shape"], cast(torch.dtype, _dtype(entry["dtype"]))
        # pruning only shrinks: a larger saved shape means another architecture, or a file asking for memory
        if len(shape) != fresh.ndim or any(s > o for s, o in zip(shape, fresh.shape)):
            raise LoadError(f"tensor {name!r}: saved shape {tuple(shape)} cannot come from pruning the model's "
                            f"{tuple(fresh.shape)}")
        if _dtype_kind(dtype) != _dtype_kind(fresh.dtype):
            raise LoadError(f"tensor {name!r}: saved dtype {_dtype_name(dtype)} cannot hold the model's "
                            f"{_dtype_name(fresh.dtype)} values; the plan was edited or is from another model")
        entries[name] = (shape, dtype)
    return entries


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def _tied_groups(names: Iterable[str], slots: Dict[str, Tuple[nn.Module, str, torch.Tensor]]) -> List[List[str]]:
    """The names grouped by tensor identity: tied weights (an LM head sharing the embedding) are one
    tensor under several names, stored once by safetensors."""
    groups: Dict[int, List[str]] = {}
    for name in names:
        groups.setdefault(id(slots[name][2]), []).append(name)
    return list(groups.values())


def _stage_tensors(directory: PathLike, plan: Dict[str, Any], entries: Dict[str, Tuple[List[int], torch.dtype]],
                   slots: Dict[str, Tuple[nn.Module, str, torch.Tensor]], staged: _Staged) -> None:
    """Read both files into new tensors (the fresh model's dtype, device and Parameter-ness); tied
    tensors get one replacement, so they stay tied."""
    for file_name, key in ((WEIGHTS_FILE, "tensors"), (BUFFERS_FILE, "buffers")):
        names = list(plan.get(key, {}))
        if not names:
            continue
        groups = _tied_groups(names, slots)
        for group in groups:
            if len({tuple(entries[n][0]) for n in group}) > 1:
                raise LoadError(f"the tied tensors {group} have different shapes in the plan; the plan was edited")
        read = _read_tensors(os.path.join(directory, file_name), {n: entries[n] for n in names}, groups,
                             lambda name, saved: _replacement(slots[name][2], saved))
        for group in groups:
            staged.tensors[id(slots[group[0]][2])] = read[group[0]]
            staged.slots.extend(slots[name] for name in group)


def _replacement(fresh: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """A copy of ``saved`` in the fresh tensor's dtype and device (a meta-device model gets CPU tensors),
    as an ``nn.Parameter`` where the fresh one was one."""
    device = torch.device("cpu") if fresh.device.type == "meta" else fresh.device
    # copy=True: the file is memory-mapped, and the model must not change when the file does
    new = saved.to(device=device, dtype=fresh.dtype, copy=True)
    if isinstance(fresh, nn.Parameter):
        return nn.Parameter(new, requires_grad=fresh.requires_grad)
    return new


@dataclass
class _Layout:
    """The fresh model's tensors with the plan's shapes for them, indexed for the attribute checks."""

    own: Dict[str, Dict[str, Tuple[int, ...]]]  # module path -> slot name -> saved shape of the tensors it holds
    holders: Set[str]  # paths of the modules that hold tensors, themselves or below
    pruned: Set[str]  # paths of the modules some tensor of whose subtree has a saved shape other than the fresh one


def _ancestors(path: str) -> List[str]:
    """``"a.b"`` -> ``["", "a", "a.b"]``: the module and every module above it."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


def _layout(slots: Dict[str, Tuple[nn.Module, str, torch.Tensor]], shapes: Dict[str, Tuple[int, ...]]) -> _Layout:
    layout = _Layout({}, set(), set())
    for name, (_, _, fresh) in slots.items():
        path, _, slot = name.rpartition(".")
        shape = shapes.get(name, tuple(fresh.shape))  # a non-persistent buffer the plan omits keeps its own
        layout.own.setdefault(path, {})[slot] = shape
        layout.holders.update(_ancestors(path))
        if shape != tuple(fresh.shape):
            layout.pruned.update(_ancestors(path))
    return layout


# ---- load: attributes ------------------------------------------------------------------------------------
_MISSING = object()


def _size_names(module: nn.Module, updater_names: Set[str]) -> Set[str]:
    """Attributes of ``module`` that pruning may shrink: those its updater writes and its width
    attribute; for classes outside PyTorch (whose sizes the registry cannot know in full) also every
    name of the size-attribute table (``num_heads``, ``head_dim``, ``intermediate_size``...). A
    PyTorch layer is known completely: ``nn.Softmax.dim`` is no size."""
    from ..ops.registry import module_spec
    from ..ops.size_names import SIZE_ATTRIBUTES

    names = set(updater_names)
    width = module_spec(module).width
    if width:
        names.add(width)
    if not type(module).__module__.startswith("torch."):
        names = names.union(*SIZE_ATTRIBUTES.values())
    return names


def _stage_attributes(attributes: Dict[str, Dict[str, Any]], target: nn.Module, layout: _Layout,
                      staged: _Staged) -> None:
    """Check every saved attribute against the fresh module and the saved tensor shapes, and stage
    those that differ. Attributes the fresh module lacks, or holds as anything but plain data, are
    never set (a plan cannot create attributes or replace methods)."""
    import structprune.ops  # noqa: F401  (registers every op: their updaters and widths are needed here)

    modules = dict(target.named_modules())
    unknown = sorted(set(attributes) - set(modules))
    if unknown:
        raise LoadError(f"the plan names module {unknown[0]!r}, which this model does not have; build the same "
                        f"architecture the pruned model came from")
    for path, module in modules.items():
        values = attributes.get(path, {})
        derived, assigned = _derived_attributes(path, module, layout.own.get(path, {}))
        # a module whose tensors all kept their shapes was not pruned: its sizes too are the fresh ones
        may_shrink = path in layout.pruned or path not in layout.holders
        sizes = _size_names(module, assigned) if may_shrink else set()
        for name in sorted(set(values) | set(derived)):
            fresh = vars(module).get(name, _MISSING)
            if name.startswith("_") or name == "training" or fresh is _MISSING or not _plain(fresh):
                continue
            where = f"{path}.{name}" if path else name
            value = _checked_value(where, fresh, values[name], name in sizes) if name in values else derived[name]
            if name in derived and not _same(value, derived[name]):
                raise LoadError(f"{where} is {values[name]!r} in the plan, but the saved tensor shapes make it "
                                f"{_as_json(derived[name])!r}: the plan contradicts its own tensors (edited or "
                                f"damaged)")
            if not _same(value, fresh):
                staged.attributes.append((module, name, value))


def _checked_value(where: str, fresh: Any, value: Any, may_shrink: bool) -> Any:
    """``value`` as the type the fresh attribute has, after checking it: a size attribute may be any
    positive int no larger than the fresh one; anything else must equal the fresh value exactly."""
    if isinstance(fresh, (tuple, list)):
        if not isinstance(value, list) or len(value) != len(fresh):
            raise _attribute_error(where, fresh, value, may_shrink)
        items = [_checked_item(where, f, v, may_shrink) for f, v in zip(fresh, value)]
        return tuple(items) if isinstance(fresh, tuple) else items
    return _checked_item(where, fresh, value, may_shrink)


def _checked_item(where: str, fresh: Any, value: Any, may_shrink: bool) -> Any:
    if may_shrink and _is_int(fresh) and fresh > 0:
        if _is_int(value) and 1 <= value <= fresh:
            return value
    elif type(value) is type(fresh) and _same(value, fresh):
        return value
    raise _attribute_error(where, fresh, value, may_shrink)


def _attribute_error(where: str, fresh: Any, value: Any, may_shrink: bool) -> LoadError:
    rule = (f"a size attribute must be a positive integer no larger than the fresh model's {_as_json(fresh)!r}"
            if may_shrink else f"pruning does not change it here, so it must equal the fresh model's "
                               f"{_as_json(fresh)!r} ({type(fresh).__name__})")
    return LoadError(f"{where} is {value!r} ({type(value).__name__}) in the plan: {rule}. The plan was edited, or "
                     f"the fresh model was built with other settings than the saved one: build it the same way "
                     f"(a size attribute of your own model is declared with sp.register_size_attribute)")


def _as_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types (``1`` is not ``True`` here), NaN equal to NaN, tuples and lists alike."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _derived_attributes(path: str, module: nn.Module, own: Dict[str, Tuple[int, ...]]
                        ) -> Tuple[Dict[str, Any], Set[str]]:
    """Run the module's registered updater on a stand-in with the saved shapes: returns what it
    derives (``out_channels`` from the conv weight...) where the module's own tensors were pruned,
    and the names it writes (the module's size attributes). The module itself is not touched."""
    from ..ops.registry import find_updater

    update = find_updater(module)
    if update is None:
        return {}, set()
    tensors = {name: t for kind in (module._buffers, module._parameters) for name, t in kind.items() if t is not None}
    old = {name: tuple(tensors[name].shape) for name in own}
    touched = any(own[name] != old[name] for name in own)
    shadow, record = _recording_shadow(module, own)
    try:
        update(shadow, old)
    except Exception as error:  # the updater's arithmetic on shapes that cannot come from pruning
        if not touched:
            return {}, set()  # an updater only ever runs on pruned modules: this one learns nothing
        raise LoadError(f"the saved tensor shapes of {path or 'the model'} ({type(module).__name__}) cannot come "
                        f"from pruning it ({type(error).__name__}: {_first_line(error)}); the plan was edited") \
            from None
    written = {name: value for name, value in record(shadow).items() if not name.startswith("_")}
    return (written if touched else {}), set(written)


_RECORDERS: Dict[type, Optional[type]] = {}
_RECORD = "_structprune_assigned"


def _recorder_class(cls: type) -> Optional[type]:
    """A subclass of ``cls`` whose ``__setattr__`` notes each assignment (None where the class cannot
    be subclassed: then the attributes whose value changed stand for those written)."""
    if cls not in _RECORDERS:
        def __setattr__(self: nn.Module, name: str, value: Any) -> None:
            self.__dict__[_RECORD][name] = value
            setter: Any = cls.__setattr__
            setter(self, name, value)

        try:
            _RECORDERS[cls] = type(cls.__name__, (cls,), {"__setattr__": __setattr__, "__module__": cls.__module__})
        except Exception:  # a metaclass or __init_subclass__ that refuses
            _RECORDERS[cls] = None
    return _RECORDERS[cls]


def _recording_shadow(module: nn.Module, shapes: Dict[str, Tuple[int, ...]]
                      ) -> Tuple[nn.Module, Callable[[nn.Module], Dict[str, Any]]]:
    """A stand-in for ``module`` for its updater to run on: its own attribute dict (mutable values
    copied), its tensors replaced by meta tensors of the saved shapes (no memory), the module itself
    untouched. Returns it with a function that, after the update, gives the attributes written."""
    recorder = _recorder_class(type(module))
    shadow: nn.Module = object.__new__(recorder or type(module))
    state = {k: (copy.copy(v) if isinstance(v, (list, dict, set)) else v) for k, v in vars(module).items()}
    for kind in ("_parameters", "_buffers"):
        state[kind] = {name: (None if t is None else _meta_like(t, shapes.get(name, tuple(t.shape))))
                       for name, t in getattr(module, kind).items()}
    shadow.__dict__.update(state)
    shadow.__dict__[_RECORD] = {}
    if recorder is not None:
        return shadow, lambda s: dict(s.__dict__[_RECORD])
    return shadow, lambda s: {k: v for k, v in vars(s).items() if _plain(v) and not _same(v, state.get(k, _MISSING))}


def _meta_like(t: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    new = torch.empty(shape, dtype=t.dtype, device="meta")
    return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


# ---- load: configs ---------------------------------------------------------------------------------------
def _owned_configs(target: nn.Module) -> Dict[int, Any]:
    """id(config) -> a deep copy, for every config object reachable from the model (``model.config``
    and any submodule's ``.config``), copied together so that modules sharing one share its copy:
    load writes only into these copies, never into an object the caller may hold."""
    found = {id(c): c for _, m in target.named_modules() for c in [vars(m).get("config")] if _is_config(c)}
    if not found:
        return {}
    try:
        copies = copy.deepcopy(list(found.values()))
    except Exception as error:
        raise LoadError(f"the model's config ({type(next(iter(found.values()))).__name__}) cannot be copied "
                        f"({type(error).__name__}: {_first_line(error)}); load never writes into a config the caller "
                        f"may share with another model") from None
    return dict(zip(found, copies))


def _stage_configs(fields: Dict[str, Any], target: nn.Module, pruned: bool, staged: _Staged) -> None:
    """Give every module its own copy of its config, the root's copy with the plan's fields (each
    checked: a size field may shrink, any other must equal the fresh value)."""
    copies = _owned_configs(target)
    root = vars(target).get("config")
    if fields and not _is_config(root):
        raise LoadError(f"the plan has config fields ({sorted(fields)[:3]}...) but this model has no config; "
                        f"build the same architecture the pruned model came from")
    from ..ops.size_names import role_of

    for name, value in fields.items():
        fresh = vars(root).get(name, _MISSING)
        if name.startswith("_") or fresh is _MISSING or not _numeric_field(fresh):
            continue  # a field this version of the config class lacks: not created
        checked = _checked_value(f"config.{name}", fresh, value, pruned and role_of(name) is not None)
        if not _same(checked, fresh):
            _set_config_field(copies[id(root)], name, checked)
    for _, module in target.named_modules():
        config = vars(module).get("config")
        if id(config) in copies and _is_config(config):
            staged.configs.append((module, copies[id(config)]))


def _set_config_field(config: Any, name: str, value: Any) -> None:
    """Write one field into load's own config copy (a frozen config refuses: then loading cannot go on)."""
    try:
        setattr(config, name, value)
    except Exception as error:
        raise LoadError(f"config.{name} cannot be set to {value!r} on {type(config).__name__} ({type(error).__name__}: "
                        f"{_first_line(error)}); the pruned sizes cannot be recorded in this config") from None


# ---- load: the swap --------------------------------------------------------------------------------------
def _swap(staged: _Staged) -> None:
    """Put everything staged into the model. Every check has passed: what is left are assignments
    (through ``setattr``, so modules that track their tensors, such as ``nn.LSTM``, see them)."""
    for module, name, old in staged.slots:
        setattr(module, name, staged.tensors[id(old)])
    for module, name, value in staged.attributes:
        setattr(module, name, value)
    for module, config in staged.configs:
        setattr(module, "config", config)
