"""Size attributes by name: which integer attribute of a module or config holds which kind of size.

Model code keeps sizes next to its tensors (``self.num_heads``, ``config.intermediate_size``) and
reads them to reshape activations. Rules ask this table whether a literal size in the graph is
such an attribute (then it can follow pruning: it is rewritten afterwards, see
``surgery/size_attributes.py``); :func:`register_size_attribute` teaches it other codebases' names.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from torch import nn

from ..errors import InvalidOptionError
from ..options import check_choice

SIZE_ATTRIBUTES: Dict[str, set] = {
    "heads": {"num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "num_kv_heads",
              "n_kv_heads", "multi_query_group_num", "nheads"},
    "head_dim": {"head_dim", "attention_head_size", "head_size", "d_head", "dim_head", "d_kv"},
    "attention_width": {"all_head_size", "split_size", "attn_dim", "inner_dim", "inner_size"},
    "ffn": {"intermediate_size", "moe_intermediate_size", "n_inner", "ffn_dim", "d_ff", "dim_feedforward", "mlp_dim",
            "hidden_dim", "encoder_ffn_dim", "decoder_ffn_dim"},
    "hidden": {"hidden_size", "n_embd", "d_model", "dim", "embed_dim", "word_embed_proj_dim", "hidden_dim"},
    # the whole width a module splits evenly, ``x.split(self.in_channels // self.num_paths)`` (timm's SelectiveKernel)
    "split_total": {"in_channels"},
}


def register_size_attribute(role: str, name: str) -> None:
    """Teach structprune that attribute ``name`` holds a size of kind ``role`` (one of ``SIZE_ATTRIBUTES``)."""
    check_choice("role", role, sorted(SIZE_ATTRIBUTES))
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidOptionError(f"name must be an attribute name such as 'n_heads', got {name!r}")
    SIZE_ATTRIBUTES[role].add(name)


def role_of(name: str) -> Optional[str]:
    """The first role naming ``name`` (``hidden_dim`` is a feed-forward width in Hugging Face configs)."""
    for role, names in SIZE_ATTRIBUTES.items():
        if name in names:
            return role
    return None


def size_attributes(module: nn.Module, value: int, roles: Iterable[str]) -> List[str]:
    """Names (``"num_heads"``, ``"config.num_attention_heads"``) of the ``roles`` attributes of
    ``module`` and of its ``config`` whose current value is ``value``."""
    roles = set(roles)
    found = []
    for prefix, owner in (("", module), ("config.", getattr(module, "config", None))):
        # a submodule that happens to be called ``config`` is no model config: its sizes are its own
        if owner is None or (prefix and isinstance(owner, nn.Module)):
            continue
        for name, v in int_attributes(owner):
            if v == value and any(name in SIZE_ATTRIBUTES[role] for role in roles):
                found.append(prefix + name)
    return found


def int_attributes(owner: Any) -> Iterator[Tuple[str, int]]:
    """``(name, value)`` of every public integer attribute of ``owner``."""
    items = vars(owner).items() if hasattr(owner, "__dict__") else ()
    for name, v in items:
        # bool is an int: a ``True`` flag would otherwise match a literal 1
        if isinstance(v, int) and not isinstance(v, bool) and not name.startswith("_"):
            yield name, v
