"""The logits in what a model returned, read one way everywhere (gradient criteria's default loss, distillation)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch


def logits_of(output: Any) -> Optional[torch.Tensor]:
    """The logits of a model output, or None: the output itself if it is a tensor, else its ``logits``
    (attribute of a Hugging Face ``ModelOutput``, or key of a dict), else the first element of a tuple or
    list (``return_dict=False``)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    return logits if isinstance(logits, torch.Tensor) else None
