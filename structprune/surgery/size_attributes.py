"""Size attributes: the integers a model keeps next to its tensors (``num_heads``, ``head_dim``,
``config.intermediate_size``...).

Model code reads them to reshape activations (``x.view(B, N, self.num_heads, self.head_dim)``), and
Hugging Face code reads its ``config`` to build caches and to save and reload. After pruning they
must describe the smaller tensors. Which integer means what is told by its *name*: the table in
``ops/size_names.py`` maps names to *roles*, and :func:`register_size_attribute` adds names.

Two sources of truth refresh them:

* **head splits** seen in the graph: the module whose forward splits a projection into
  (heads, head_dim) gets its head-count, head-dim and attention-width attributes rewritten;
* **parameter shapes**: config fields for the feed-forward width follow the linear layers whose
  output width they name; the hidden width follows the input embedding.

A config shared by every layer is only rewritten when all layers agree on the new value; otherwise it
is left alone and a note says so (the pruned model still runs: Hugging Face layers read their shapes
from their tensors and attributes, not from the config, at run time).
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..graph.labels import HeadSplit
from ..ops.registry import input_axis
from ..ops.size_names import SIZE_ATTRIBUTES, int_attributes, role_of


def _kept(axis: Union[np.ndarray, int], dropped: np.ndarray) -> int:
    if isinstance(axis, (int, np.integer)):
        return int(axis)
    # an int is a side of the split that never changes; -1 entries (no element) are never dropped
    return int((~dropped[axis[axis >= 0]]).sum() + (axis < 0).sum())


def _size(axis: Union[np.ndarray, int]) -> int:
    return int(axis) if isinstance(axis, (int, np.integer)) else len(axis)


def refresh_size_attributes(model: nn.Module, splits: Iterable[HeadSplit], dropped: np.ndarray,
                            old_shapes: Dict[nn.Module, Dict[str, tuple]]) -> List[str]:
    """Rewrite the size attributes of ``model`` (already shrunk) and of its configs; return notes."""
    facts: Dict[str, List[Tuple[int, int]]] = {role: [] for role in SIZE_ATTRIBUTES}  # role -> (old, new)
    # widths layers read, (old, new): a feed-forward width only a down projection shows (a fused gate_up's outputs
    # are twice it)
    input_widths: List[Tuple[int, int]] = []
    updates: Dict[Tuple[str, str], set] = {}
    for split in splits:
        module = model.get_submodule(split.path)
        heads = (_size(split.heads), _kept(split.heads, dropped))
        dims = (_size(split.dims), _kept(split.dims, dropped))
        width = (heads[0] * dims[0], heads[1] * dims[1])
        for role, (old, new) in (("heads", heads), ("head_dim", dims), ("attention_width", width)):
            facts[role].append((old, new))
            for name, value in int_attributes(module):
                # value and role must both match: a width that merely equals the old head count stays as it is
                if value == old and role_of(name) == role:
                    updates.setdefault((split.path, name), set()).add(new)
    notes: List[str] = []
    for (path, name), values in updates.items():
        if len(values) == 1:  # splits that disagree (q and v heads of different widths) leave it alone
            setattr(model.get_submodule(path), name, values.pop())
    head_dims = _layer_head_dims(model, splits) or {new for _, new in facts["head_dim"]}
    for module, shapes in old_shapes.items():
        for name, old_shape in shapes.items():
            new_shape = getattr(module, name).shape
            if isinstance(module, nn.Embedding) and name == "weight":
                facts["hidden"].append((old_shape[1], new_shape[1]))
            elif len(old_shape) == 2:
                out = 1 if input_axis(module, name) == 0 else 0  # GPT-2's Conv1D stores W as (in, out)
                # candidates only: a config field is rewritten below when its value equals such an old width
                if old_shape[out] != new_shape[out]:
                    facts["ffn"].append((old_shape[out], new_shape[out]))
                if old_shape[1 - out] != new_shape[1 - out]:
                    input_widths.append((old_shape[1 - out], new_shape[1 - out]))
            elif len(old_shape) == 3:
                # a mixture of experts' stacked weights, (experts, out, in) or (experts, in, out) when transposed:
                # either matrix dim may be the experts' feed-forward width
                for dim in (1, 2):
                    if old_shape[dim] != new_shape[dim]:
                        facts["ffn"].append((old_shape[dim], new_shape[dim]))
                        input_widths.append((old_shape[dim], new_shape[dim]))
    embeddings = input_embeddings(model)
    # the input embedding is the width ``hidden_size`` names: it overrides what other embeddings reported
    if isinstance(embeddings, nn.Embedding) and embeddings in old_shapes:
        facts["hidden"] = [(old_shapes[embeddings]["weight"][1], embeddings.weight.shape[1])]
    return notes + _refresh_configs(model, facts, head_dims, input_widths) + reload_note(model) + \
        _derived_buffer_note(model, old_shapes)


def _layer_head_dims(model: nn.Module, splits: Iterable[HeadSplit]) -> set:
    """The head sizes the attention layers themselves hold (``head_dim``, ``head_size``...), after the rewrite
    above. They, not a split's width, are what a config must describe: a fused projection split into heads
    (GPT-NeoX's ``query_key_value`` viewed as ``(heads, 3 * head_size)``) has per-head chunks of three heads'
    widths."""
    found = set()
    for path in {split.path for split in splits}:
        found |= {value for name, value in int_attributes(model.get_submodule(path)) if role_of(name) == "head_dim"}
    return found


def _derived_buffer_note(model: nn.Module, old_shapes: Dict[nn.Module, Dict[str, tuple]]) -> List[str]:
    """``from_pretrained`` recomputes non-persistent buffers from the config rather than loading them. Where
    pruning sliced one (rotary frequencies pruned in head dims), or one belongs to a layer pruning resized (Gemma's
    ``embed_scale = sqrt(hidden_size)`` on its embedding), the reloaded model would compute with other values
    than the pruned one, which keeps the original's."""
    if not hasattr(model, "from_pretrained"):
        return []
    names = {id(m): path for path, m in model.named_modules()}
    sliced = [f"{names[id(m)]}.{name}".lstrip(".") for m, shapes in old_shapes.items() for name in shapes
              if name in getattr(m, "_non_persistent_buffers_set", ()) and id(m) in names]
    resized = [f"{names[id(m)]}.{name}".lstrip(".") for m in old_shapes if id(m) in names
               for name in sorted(getattr(m, "_non_persistent_buffers_set", ())) if name not in old_shapes[m]]
    if sliced:
        return [f"pruning sliced {sliced[0]}, a buffer from_pretrained recomputes from the config rather than loads: "
                f"a from_pretrained reload would compute with other values; save with sp.save and reload with "
                f"sp.load, which keep it"]
    if resized:
        return [f"{resized[0]} is a buffer from_pretrained recomputes from the config rather than loads, in a layer "
                f"pruning resized: a from_pretrained reload may compute it from the pruned sizes, unlike the pruned "
                f"model; save with sp.save and reload with sp.load, which keep it"]
    return []


def input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The model's input embedding where it has one: Hugging Face vision models (ConvNeXt, ResNet,
    MobileNetV2) inherit ``get_input_embeddings`` and raise ``NotImplementedError`` from it."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def _refresh_configs(model: nn.Module, facts: Dict[str, List[Tuple[int, int]]], head_dims: set,
                     input_widths: List[Tuple[int, int]]) -> List[str]:
    notes = []
    configs = {id(c): c for m in model.modules() for c in [getattr(m, "config", None)]
               if c is not None and not isinstance(c, nn.Module) and hasattr(c, "__dict__")}
    for config in configs.values():
        # read before the fields below change: afterwards hidden_size // num_attention_heads is no longer the
        # head size the layers were built with
        derived_head_dim = _head_dim(config)
        for name, value in list(int_attributes(config)):
            role = role_of(name)
            if role is None or role == "attention_width":
                continue
            # every layer whose old size equals this field reports its new size; one answer is needed to rewrite it
            new = {n for old, n in facts[role] if old == value}
            if not new and role == "ffn":  # no layer produces it: a layer that reads it (Phi-3's fused gate_up)
                new = {n for old, n in input_widths if old == value}
            if len(new) == 1:
                setattr(config, name, new.pop())
            elif len(new) > 1:
                notes.append(f"config.{name} was {value}; layers now differ ({sorted(new)}), so it was left as is "
                             f"and describes the original model")
        _pin_head_dim(config, head_dims or ({derived_head_dim} if derived_head_dim else set()))
    return notes


def _head_dim(config: Any) -> Optional[int]:
    """The head size a Hugging Face attention layer derives from ``config``."""
    explicit = getattr(config, "head_dim", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if isinstance(explicit, int):
        return explicit
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        return hidden // heads
    return None


def reload_note(model: nn.Module) -> List[str]:
    """Can ``from_pretrained`` rebuild the pruned model from its refreshed config? Build the class from
    the config on the meta device (no memory) and compare shapes. Some configs cannot say it (BERT and
    GPT-2 derive the head size from ``hidden_size / num_attention_heads``), some refuse it (LLaMA insists
    that ``hidden_size`` be a multiple of the head count); the pruned model runs either way."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "from_pretrained") or isinstance(config, nn.Module):
        return []
    shapes = _tensor_shapes(model)
    try:
        validate = getattr(config, "validate", None)  # what from_pretrained runs on a loaded config
        if callable(validate):
            validate()
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # on a copy: some models' __init__ write back into the config they are given
            rebuilt = type(model)(copy.deepcopy(config))
    except Exception as error:  # the library's own validation error types vary
        reason = str(getattr(error, "__cause__", None) or error).strip().splitlines()[-1]
        # transformers validates a config when it saves it too: save_pretrained itself raises
        return [f"save_pretrained and from_pretrained will refuse the pruned config ({reason}); the model runs: "
                f"save it with sp.save and reload it with sp.load, which keep any widths, or pick ratios the config "
                f"can express"]
    rebuilt_shapes = _tensor_shapes(rebuilt)
    differ = [k for k, shape in rebuilt_shapes.items() if k in shapes and shape != shapes[k]]
    if differ:
        return [f"{type(config).__name__} cannot describe the pruned shapes (e.g. {differ[0]}: the config rebuilds "
                f"{rebuilt_shapes[differ[0]]}, the model has {shapes[differ[0]]}); the model runs, "
                f"but from_pretrained would rebuild the original layout"]
    return []


def _tensor_shapes(model: nn.Module) -> Dict[str, tuple]:
    """Shapes of the state dict and of the buffers it leaves out (non-persistent: rotary frequencies), which
    from_pretrained rebuilds from the config, so a config that disagrees with them shows there too."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update((k, tuple(v.shape)) for k, v in model.named_buffers())
    return shapes


def _pin_head_dim(config: Any, head_dims: set) -> None:
    """Hugging Face attention derives ``head_dim = hidden_size // num_attention_heads`` unless the
    config says otherwise; once heads and hidden width are pruned apart that no longer holds."""
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if len(head_dims) != 1 or not isinstance(heads, int) or not isinstance(hidden, int) or heads <= 0:
        return
    head_dim = next(iter(head_dims))
    if getattr(config, "head_dim", None) is None and hidden // heads != head_dim:
        config.head_dim = head_dim
