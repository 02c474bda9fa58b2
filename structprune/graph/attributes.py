"""What a ``get_attr`` node reads: the object at a dotted path under the traced root module."""
from __future__ import annotations

from typing import Any

from torch import nn


def attribute_at(root: nn.Module, path: str) -> Any:
    """The object at ``path`` (``"layer1.0.conv1.weight"``, or a tensor constant fx stored on the root) under
    ``root``; None where the path names nothing (a graph read against another copy of the model)."""
    owner: Any = root
    for name in path.split("."):
        owner = getattr(owner, name, None)
        if owner is None:
            return None
    return owner
