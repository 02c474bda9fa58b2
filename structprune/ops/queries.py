"""Shape queries: ``x.size()``, ``x.shape``, ``x.dim()``, ``len(x)``, tensor attributes. No tensor comes out,
so there is nothing to couple or freeze (``x.T`` and ``x.mT``, read as attributes, are transposes)."""
from __future__ import annotations

import builtins

import torch

from ..graph.shapes import TensorMeta
from .context import RuleContext
from .permute import last_two_swapped, matrix_transpose
from .registry import rule

_TRANSPOSING_ATTRIBUTES = {"T": matrix_transpose, "mT": last_two_swapped, "mH": last_two_swapped,
                           "H": matrix_transpose}


@rule(".size", ".dim", ".numel", ".ndimension", ".nelement", ".get_device", ".is_contiguous", "aten.sym_size",
      "aten.size", "aten.dim", "aten.numel", "aten._assert_tensor_metadata", "aten._assert_scalar",
      "aten.sym_constrain_range_for_size", torch._assert, builtins.getattr, builtins.len, builtins.int,
      builtins.float)
def shape_query(ctx: RuleContext, node):
    if node.target is builtins.getattr and ctx.arg(1) in _TRANSPOSING_ATTRIBUTES:
        return _TRANSPOSING_ATTRIBUTES[ctx.arg(1)](ctx, node)
    out = ctx.out
    if isinstance(out, TensorMeta) or (isinstance(out, (list, tuple)) and any(isinstance(o, TensorMeta)
                                                                                 for o in out)):
        ctx.freeze_inputs("shape query returned a tensor")
        return ctx.unlabeled_output()
    # metadata reads are harmless; any other attribute (``x.data``, a custom field) may carry values we cannot see
    if node.target is builtins.getattr and ctx.arg(1) not in ("shape", "dtype", "device", "ndim", "is_cuda",
                                                              "requires_grad", "layout"):
        ctx.freeze_inputs(f"attribute {ctx.arg(1)!r} read from a tensor")
    return None
