"""2:4 masks as torch's semi-structured sparse tensors (CUDA GPUs with sparse tensor cores)."""
from __future__ import annotations

import warnings

from torch import nn
from torch.nn.utils import parametrize

from ..errors import StructPruneError
from .parametrize import Mask, parametrization_list


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Turn every 2:4-masked ``nn.Linear`` weight into ``torch.sparse.to_sparse_semi_structured`` (in
    place; masks are baked first). Needs the weights on a CUDA GPU with sparse tensor cores (Ampere or
    newer); elsewhere it warns and leaves the dense masked model as it is."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight")
               and any(isinstance(p, Mask) and p.granularity == "2:4" for p in parametrization_list(m, "weight"))]
    if not linears:
        raise StructPruneError("no Linear weight carries a 2:4 mask: call sparsify(model, granularity='nm', n=2, m=4)")
    if not all(parametrization_list(m, "weight").original.is_cuda for m in linears):
        warnings.warn("semi-structured 2:4 sparse tensors need the weights on a CUDA GPU (Ampere or newer); "
                      "the model stays dense with its 2:4 masks (correct, but not faster)", stacklevel=2)
        return model
    from torch.sparse import to_sparse_semi_structured

    for module in linears:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return model
