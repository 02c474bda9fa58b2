"""The arithmetic verification compares in: exact enough to see a wrong channel, on any device and dtype.

Verification checks structure: the pruned model must compute what the original computes with the
removed channels zeroed. Both sides only reorder float sums, so they agree to rounding error, and a
wrong coupling shows as an error many times larger. That margin disappears when the arithmetic
itself is coarse: bf16 keeps 8 bits of mantissa, fp16 11, and TF32 (the CUDA default for fp32
convolutions) 10, so rounding alone reaches the size of a subtle mistake.

So verification does not loosen its tolerance; it sharpens the arithmetic. Inside
:func:`checking_precision`:

- fp32 matmuls and convolutions run in full IEEE fp32 (TF32 and oneDNN's bf16 paths off), restored
  afterwards;
- a model held in fp16 or bf16 computes in fp32 on its own device: its floating parameters and
  buffers are swapped for fp32 copies (tied weights stay tied), the example input is cast the same
  way, and the caller's tensors are put back untouched. The values are the user's, so the check
  stays a check of *this* model.

A model whose forward pins its dtype (a graph that casts to bf16 by literal) cannot compute in fp32;
:func:`native_tolerance` then gives the relative tolerance for checking it in its own dtype.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

import torch
from torch import nn
from torch.utils._pytree import tree_map

RTOL = 1e-4  # relative to the largest reference magnitude, in fp32 (or fp64) arithmetic
# checking in the model's own low-precision dtype (only when fp32 is impossible): a few rounding steps of that dtype
NATIVE_RTOL: Dict[torch.dtype, float] = {torch.float16: 2e-2, torch.bfloat16: 8e-2}
LOW_PRECISION = (torch.float16, torch.bfloat16)

# (module path in torch.backends, attribute): the fp32 precision switches of torch >= 2.9
_PRECISION_SWITCHES = (("cuda.matmul", "fp32_precision"), ("cudnn.conv", "fp32_precision"),
                       ("cudnn.rnn", "fp32_precision"), ("mkldnn.matmul", "fp32_precision"),
                       ("mkldnn.conv", "fp32_precision"), ("mkldnn.rnn", "fp32_precision"))


def compute_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype verification computes ``model`` in: fp32 when any floating tensor of it is fp16/bf16,
    None (its own) otherwise."""
    tensors = list(model.parameters()) + list(model.buffers())
    return torch.float32 if any(t.dtype in LOW_PRECISION for t in tensors) else None


def native_tolerance(model: nn.Module) -> float:
    """The relative tolerance for checking ``model`` in its own dtype (the coarsest one it holds)."""
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers())}
    return max([RTOL] + [NATIVE_RTOL[d] for d in dtypes if d in NATIVE_RTOL])


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Full-precision fp32 matmuls and convolutions for the block (no TF32, no bf16 emulation)."""
    saved: List[Tuple[Any, str, Any]] = []
    try:
        if hasattr(torch.backends, "fp32_precision"):
            for path, attribute in _PRECISION_SWITCHES:
                holder = _backend(path)
                if holder is not None and hasattr(holder, attribute):
                    saved.append((holder, attribute, getattr(holder, attribute)))
                    setattr(holder, attribute, "ieee")
        else:  # torch < 2.9: the legacy switches
            for holder, attribute in ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")):
                saved.append((holder, attribute, getattr(holder, attribute)))
                setattr(holder, attribute, False)
        yield
    finally:
        for holder, attribute, value in reversed(saved):
            setattr(holder, attribute, value)


def _backend(path: str) -> Any:
    holder: Any = torch.backends
    for part in path.split("."):
        holder = getattr(holder, part, None)
        if holder is None:
            return None
    return holder


@contextlib.contextmanager
def computing_in(model: nn.Module, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Swap ``model``'s floating parameters and buffers for ``dtype`` copies for the block (None: no-op).

    The copies go straight into the modules' slot dicts and the caller's tensors are put back after,
    untouched (not even their autograd version counters change); a tensor shared by two modules gets
    one copy, so tied weights stay tied."""
    if dtype is None:
        yield
        return
    copies: Dict[int, torch.Tensor] = {}
    swapped: List[Tuple[Dict[str, Any], str, torch.Tensor]] = []
    try:
        for module in model.modules():
            # the slot dicts typed wider than torch declares them: a plain tensor goes where a Parameter was
            for slots in (cast(Dict[str, Any], module._parameters), cast(Dict[str, Any], module._buffers)):
                for name, tensor in list(slots.items()):
                    if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                        continue
                    if id(tensor) not in copies:
                        copies[id(tensor)] = tensor.detach().to(dtype)
                    swapped.append((slots, name, tensor))
                    slots[name] = copies[id(tensor)]
        yield
    finally:
        for slots, name, tensor in reversed(swapped):
            slots[name] = tensor


def cast_floats(value: Any, dtype: Optional[torch.dtype]) -> Any:
    """``value`` (tensors nested in lists, tuples and dicts) with every floating tensor cast to ``dtype``."""
    if dtype is None:
        return value
    return tree_map(lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v, value)


__all__ = ["LOW_PRECISION", "NATIVE_RTOL", "RTOL", "cast_floats", "compute_dtype", "computing_in", "ieee_fp32",
           "native_tolerance"]
