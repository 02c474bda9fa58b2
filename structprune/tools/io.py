"""Saving and loading pruned models without pickle.

A saved model is a directory with two files, and a third where the model has them:

* ``model.safetensors``: every parameter and buffer (``safetensors.torch.save_model``, which also
  handles tied weights such as a language model head sharing the embedding);
* ``buffers.safetensors``: the non-persistent buffers (``state_dict`` leaves them out, but pruning
  may have sliced them: the rotary frequencies ``inv_freq`` of a model pruned in head dims);
* ``structprune.json``: a versioned plan of the pruned shapes: the shape of every tensor, the size
  attributes of every module (``out_channels``, ``num_heads``...) and a Hugging Face config's
  integer fields.

:func:`load` builds a fresh, unpruned model from the caller's own code (a factory or an instance),
resizes its tensors and attributes to the plan, then loads the weights. Nothing in either file is
executed: JSON is parsed as data, safetensors holds raw tensors, and every entry is checked against
the fresh model before anything changes, so a malformed, truncated or mismatching file is refused
with a clear error.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Union

import torch
from torch import nn

from ..errors import InvalidOptionError, LoadError
from ..options import require_module

FORMAT = "structprune"
VERSION = 1
PLAN_FILE = "structprune.json"
WEIGHTS_FILE = "model.safetensors"
BUFFERS_FILE = "buffers.safetensors"
_PLAIN = (int, float, bool, str, type(None))


def _plain(value: Any) -> bool:
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


def _config_fields(model: nn.Module) -> Dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or isinstance(config, nn.Module) or not hasattr(config, "__dict__"):
        return {}
    return {k: v for k, v in vars(config).items() if not k.startswith("_") and isinstance(v, (int, float, bool))}


def save(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write ``model`` (typically pruned) to ``directory`` as safetensors weights plus a JSON plan."""
    from safetensors.torch import save_model

    require_module(model)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InvalidOptionError(f"{directory} is a file; save writes a directory (model.safetensors + "
                                 f"{PLAN_FILE}): pass a new or existing directory path")
    os.makedirs(directory, exist_ok=True)
    state = model.state_dict(keep_vars=True)
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                    for name, t in state.items() if isinstance(t, torch.Tensor)},
        "attributes": _attributes(model),
        "config": _config_fields(model),
    }
    buffers = _non_persistent_buffers(model)
    if buffers:
        plan["buffers"] = {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                           for name, t in buffers.items()}
    save_model(model, os.path.join(directory, WEIGHTS_FILE))
    if buffers:
        from safetensors.torch import save_file

        # clones: safetensors refuses tensors that share memory, and a buffer may be a view
        save_file({name: t.detach().cpu().contiguous().clone() for name, t in buffers.items()},
                  os.path.join(directory, BUFFERS_FILE))
    with open(os.path.join(directory, PLAN_FILE), "w") as f:
        json.dump(plan, f, indent=1, sort_keys=True)


def load(directory: Union[str, os.PathLike], model: Union[nn.Module, Callable[[], nn.Module]]) -> nn.Module:
    """Rebuild a model saved by :func:`save`: ``model`` is an unpruned instance of the same
    architecture or a function that builds one (it is modified and returned)."""
    if not (callable(model) or isinstance(model, nn.Module)):  # the cheap check before any file is read
        raise LoadError(f"load needs an nn.Module or a function returning one, got {type(model).__name__}")
    plan = _read_plan(directory)
    target = model() if callable(model) and not isinstance(model, nn.Module) else model
    if not isinstance(target, nn.Module):
        raise LoadError(f"load needs an nn.Module or a function returning one, got {type(target).__name__}")
    _check_plan(plan, target)
    _check_buffers(plan, target)
    _resize_tensors(target, plan["tensors"])
    _set_attributes(target, plan["attributes"], plan.get("config", {}))
    _load_weights(target, os.path.join(directory, WEIGHTS_FILE))
    if plan.get("buffers"):
        _load_buffers(target, os.path.join(directory, BUFFERS_FILE))
    return target


def _non_persistent_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Fully-qualified name -> tensor of every buffer ``state_dict`` leaves out."""
    found = {}
    for path, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            t = module._buffers.get(name)
            if isinstance(t, torch.Tensor):
                found[f"{path}.{name}" if path else name] = t
    return found


def _check_buffers(plan: dict, model: nn.Module) -> None:
    buffers = _non_persistent_buffers(model)
    for name, entry in plan.get("buffers", {}).items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if name not in buffers:
            raise LoadError(f"the saved plan names a non-persistent buffer {name!r} this model does not have; "
                            f"build the same architecture the pruned model came from")
        original = buffers[name].shape
        if not (isinstance(shape, list) and len(shape) == len(original) and all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= o for s, o in zip(shape, original))):
            raise LoadError(f"buffer {name!r}: saved shape {shape!r} cannot come from pruning the model's "
                            f"{tuple(original)}")


def _load_buffers(model: nn.Module, path: str) -> None:
    """Replace the non-persistent buffers with the saved ones (their shapes were checked against the plan)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(path)
    except (SafetensorError, RuntimeError, OSError, ValueError) as error:
        raise LoadError(f"{path} could not be read ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
                        f"the file is missing, truncated or damaged") from None
    for name, t in _non_persistent_buffers(model).items():
        if name in saved:
            owner, _, attribute = name.rpartition(".")
            model.get_submodule(owner)._buffers[attribute] = saved[name].to(device=t.device, dtype=t.dtype)


def _read_plan(directory) -> dict:
    path = os.path.join(directory, PLAN_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        raise LoadError(f"{directory} is not a saved structprune model: it needs {PLAN_FILE} and {WEIGHTS_FILE}")
    try:
        with open(path) as f:
            plan = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise LoadError(f"{path} is not valid JSON ({error}); the file is damaged or not a structprune plan") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise LoadError(f"{path} is not a structprune plan (no 'format': '{FORMAT}' entry)")
    if plan.get("version") != VERSION:
        raise LoadError(f"{path} has plan version {plan.get('version')!r}; this structprune reads version {VERSION}")
    for key, kind in (("tensors", dict), ("attributes", dict), ("config", dict), ("buffers", dict)):
        if not isinstance(plan.get(key, {}), kind):
            raise LoadError(f"{path}: '{key}' must be a JSON object")
    return plan


def _check_plan(plan: dict, model: nn.Module) -> None:
    state = model.state_dict(keep_vars=True)
    missing = sorted(set(state) - set(plan["tensors"]))
    extra = sorted(set(plan["tensors"]) - set(state))
    if missing or extra:
        raise LoadError(f"the saved plan does not match this model: {len(missing)} tensors missing from the file "
                        f"(e.g. {missing[:3]}), {len(extra)} unknown to the model (e.g. {extra[:3]}); build the "
                        f"same architecture the pruned model came from")
    for name, entry in plan["tensors"].items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                 for s in shape)):
            raise LoadError(f"tensor {name!r} has an invalid shape in the plan: {shape!r}")
        # pruning only shrinks: a larger saved shape means another architecture, or a file asking for memory
        if len(shape) != state[name].ndim or any(s > o for s, o in zip(shape, state[name].shape)):
            raise LoadError(f"tensor {name!r}: saved shape {tuple(shape)} cannot come from pruning the model's "
                            f"{tuple(state[name].shape)}")


def _resize_tensors(model: nn.Module, tensors: Dict[str, dict]) -> None:
    replaced: Dict[int, torch.Tensor] = {}
    for path, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            slots = getattr(module, kind)
            for name, t in list(slots.items()):
                fqn = f"{path}.{name}" if path else name
                if t is None or fqn not in tensors:
                    continue  # non-persistent buffers are not saved: the fresh model's stay
                if id(t) not in replaced:  # tied tensors stay tied
                    # empty is enough: _load_weights fills every persistent tensor next, strictly
                    new = torch.empty(tensors[fqn]["shape"], dtype=t.dtype, device=t.device)
                    replaced[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else new
                slots[name] = replaced[id(t)]


def _set_attributes(model: nn.Module, attributes: Dict[str, dict], config: Dict[str, Any]) -> None:
    """Restore the plan's plain attributes; only attributes the fresh module already has, of a plain type."""
    modules = dict(model.named_modules())
    for path, values in attributes.items():
        module = modules.get(path)
        if module is None or not isinstance(values, dict):
            raise LoadError(f"the plan names module {path!r}, which this model does not have")
        for name, value in values.items():
            current = vars(module).get(name, _MISSING)
            if current is _MISSING or not _plain(current) or not _plain(value):
                continue  # never create attributes or overwrite anything that is not plain data
            setattr(module, name, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
    target_config = getattr(model, "config", None)
    for name, value in config.items():
        if target_config is not None and isinstance(getattr(target_config, name, None), (int, float, bool)) \
                and isinstance(value, (int, float, bool)):
            setattr(target_config, name, value)


_MISSING = object()


def _load_weights(model: nn.Module, path: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, path, strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as error:
        raise LoadError(f"{path} could not be read as the plan describes it ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:300]}); the file is truncated, damaged or from another model") \
            from None
