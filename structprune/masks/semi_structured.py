"""2:4 masks as torch's semi-structured sparse tensors (CUDA GPUs with sparse tensor cores).

torch has two kernel backends for semi-structured sparsity, and which one works depends on the card:

* cuSPARSELt (``torch.sparse.SparseSemiStructuredTensorCUSPARSELT``): NVIDIA's library, sm_80 and newer
  (Hopper included) when torch was built with it; float16, bfloat16, int8 and float8 only.
* CUTLASS (``torch.sparse.SparseSemiStructuredTensorCUTLASS``): kernels compiled into torch for the
  Ampere/Ada family (sm_80-sm_89) only; they refuse to run on Hopper (sm_90). Also takes float32.

:func:`choose_backend` holds that decision as a pure function (so it is testable without a GPU), and
:func:`to_semi_structured` applies it per device.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import InvalidOptionError, StructPruneError
from .parametrize import Mask, parametrization_list

BACKENDS = ("cusparselt", "cutlass")


def _sm(capability: Tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def check_backend(backend: Optional[str]) -> Optional[str]:
    """``backend`` itself when it names a backend or is None; else an :class:`InvalidOptionError`."""
    if backend is not None and backend not in BACKENDS:
        raise InvalidOptionError(f"backend must be one of {', '.join(map(repr, BACKENDS))} or None (automatic), "
                                 f"got {backend!r}")
    return backend


def choose_backend(capability: Tuple[int, int], cusparselt_available: bool, requested: Optional[str] = None) -> str:
    """The semi-structured backend to use on a card of compute ``capability`` (``(major, minor)``).

    ``cusparselt_available`` says whether cuSPARSELt can serve the weights (torch built with it, and
    the dtype one it takes). ``requested`` is ``"cusparselt"``, ``"cutlass"`` or None (automatic:
    cuSPARSELt when available, because it is the only backend on Hopper and at least as fast elsewhere;
    CUTLASS on sm_80-sm_89 otherwise). Raises :class:`InvalidOptionError` for an unknown ``requested``
    and :class:`StructPruneError` when the card cannot run the chosen backend."""
    check_backend(requested)
    sm = _sm(capability)
    if tuple(capability) < (8, 0):
        raise StructPruneError(f"this GPU ({sm}) has no sparse tensor cores: 2:4 semi-structured sparsity needs "
                               f"an Ampere (sm_80) or newer card")
    cutlass_runs = capability[0] == 8  # torch's CUTLASS kernels are built for the sm_80 family only
    if requested == "cusparselt" or (requested is None and cusparselt_available):
        if not cusparselt_available:
            raise StructPruneError("backend='cusparselt' is not available here (torch.backends.cusparselt."
                                   "is_available() is False, or the weights' dtype is not one cuSPARSELt takes: "
                                   "float16, bfloat16, int8, float8)"
                                   + ("; backend='cutlass' works on this card" if cutlass_runs else ""))
        return "cusparselt"
    if not cutlass_runs:
        what = "backend='cutlass' cannot run" if requested == "cutlass" else "no semi-structured backend runs"
        raise StructPruneError(f"{what} on this GPU ({sm}): torch's CUTLASS semi-structured kernels support "
                               "sm_80-sm_89 only, and cuSPARSELt "
                               + ("is the backend to use here (backend='cusparselt' or None)" if cusparselt_available
                                  else "is not available (torch built without it, or a dtype it does not take: "
                                       "use float16 or bfloat16 weights)"))
    return "cutlass"


def _backend_class(name: str) -> Type[torch.sparse.SparseSemiStructuredTensor]:
    return {"cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
            "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS}[name]


def _takes_dtype(name: str, dtype: torch.dtype) -> bool:
    return dtype in getattr(_backend_class(name), "_DTYPE_SHAPE_CONSTRAINTS", {dtype: None})


def semi_structured_backend(weight: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend :func:`to_semi_structured` uses for a CUDA ``weight`` (its card and dtype); raises
    like :func:`choose_backend`, and when the chosen backend has no kernels for the weight's dtype."""
    check_backend(backend)
    capability = torch.cuda.get_device_capability(weight.device)
    built = bool(torch.backends.cusparselt.is_available())
    name = choose_backend(capability, built and _takes_dtype("cusparselt", weight.dtype), backend)
    if not _takes_dtype(name, weight.dtype):
        raise StructPruneError(f"the {name} semi-structured backend has no kernels for {weight.dtype} weights; "
                               f"cast the model to float16 or bfloat16 first")
    return name


def _masked_linears(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, Mask) and p.granularity == "2:4" for p in parametrization_list(m, "weight"))]


def to_semi_structured(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Turn every 2:4-masked ``nn.Linear`` weight into a torch semi-structured sparse tensor (in place;
    masks are baked first).

    ``backend``: ``"cusparselt"``, ``"cutlass"`` or None (automatic, per device: see
    :func:`choose_backend`; Hopper needs cuSPARSELt). Needs the weights on a CUDA GPU with sparse tensor
    cores (Ampere or newer); on a CPU it warns and leaves the dense masked model as it is. Every weight
    is converted before any is replaced, so a weight the backend refuses (dtype, shape) raises a
    :class:`StructPruneError` naming the layer and leaves the model unchanged."""
    check_backend(backend)  # a bad value is reported before anything else
    linears = _masked_linears(model)
    if not linears:
        raise StructPruneError("no Linear weight carries a 2:4 mask: call sparsify(model, granularity='nm', n=2, m=4)")
    if not all(parametrization_list(m, "weight").original.is_cuda for _, m in linears):
        warnings.warn("semi-structured 2:4 sparse tensors need the weights on a CUDA GPU (Ampere or newer); "
                      "the model stays dense with its 2:4 masks (correct, but not faster)", stacklevel=2)
        return model
    chosen: Dict[Tuple[torch.device, torch.dtype], str] = {}
    converted = []
    for name, module in linears:
        weight = module.weight.detach().contiguous()  # the masked weight (parametrization applied)
        key = (weight.device, weight.dtype)
        if key not in chosen:
            chosen[key] = semi_structured_backend(weight, backend)
        try:
            converted.append(_backend_class(chosen[key]).from_dense(weight))
        except RuntimeError as error:  # torch's shape/dtype checks
            raise StructPruneError(f"layer {name!r} cannot become a {chosen[key]} semi-structured tensor: "
                                   f"{str(error).splitlines()[0]}") from error
    for (_, module), sparse in zip(linears, converted):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight = nn.Parameter(sparse, requires_grad=False)
    return model
