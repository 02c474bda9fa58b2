"""Granularities that keep shapes: masks on weights, from single weights to whole channels.

The chapter's granularities, finest to coarsest: single weights (``"element"``), N:M patterns
(``"nm"``), whole rows or columns of a weight matrix (``"vector"``), whole kernels (``"kernel"``) and
whole channels (``"channel"``, coupled across every layer that shares them). One mask mechanism
(:mod:`.parametrize`) serves them all; :func:`apply_masks` turns channel masks into physical pruning
and :func:`to_semi_structured` turns 2:4 masks into sparse tensors on CUDA.
"""
from .channels import apply_masks
from .granularities import Granularity, MaskRequest, list_granularities, nm_mask, register_granularity
from .parametrize import Mask, SparsityReport, masks, remove_masks, set_mask, sparsity_report
from .semi_structured import to_semi_structured
from .sparsify import sparsify

__all__ = ["Granularity", "Mask", "MaskRequest", "SparsityReport", "apply_masks", "list_granularities", "masks",
           "nm_mask", "register_granularity", "remove_masks", "set_mask", "sparsify", "sparsity_report",
           "to_semi_structured"]
