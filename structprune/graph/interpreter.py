"""The base of every fx interpreter structprune runs a captured graph with.

fx hands a node's list and dict arguments over as ``immutable_list`` / ``immutable_dict`` (they guard
the graph's own arguments from edits). A model's generated ``forward`` passes plain lists instead, and
some model code relies on that: torchvision's ``swin_transformer._get_window_and_shift_size`` writes
into the list it is given. :class:`GraphInterpreter` passes fresh mutable copies, so every function
runs under structprune exactly as it does in the model.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from torch import fx
from torch.fx.immutable_collections import immutable_dict, immutable_list


def mutable(value: Any) -> Any:
    """``value`` with every fx immutable list/dict in it (at any depth) replaced by a plain copy.

    Other values, tuples included, are returned as they are (a tuple holding an immutable list is rebuilt
    around the copy); the copies are new objects, so a function that mutates them leaves the graph alone."""
    if isinstance(value, immutable_list):
        return [mutable(item) for item in value]
    if isinstance(value, immutable_dict):
        return {key: mutable(item) for key, item in value.items()}
    if type(value) is tuple:  # named tuples and other subclasses are kept as they are
        items = tuple(mutable(item) for item in value)
        return value if all(a is b for a, b in zip(items, value)) else items
    return value


class GraphInterpreter(fx.Interpreter):
    """An ``fx.Interpreter`` whose nodes receive plain, mutable lists and dicts as arguments."""

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> Tuple[Tuple, Dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return mutable(args), mutable(kwargs)
