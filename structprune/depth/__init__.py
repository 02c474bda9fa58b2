"""Depth pruning: remove whole residual blocks, least influential first (ShortGPT's block influence).

``find`` names the candidates (:func:`residual_blocks`), ``rank`` measures how much each one changes its
input on calibration data (:func:`block_influence`), and ``remove`` deletes the chosen ones from a deep
copy, renumbering the stacks and, for Hugging Face models, the config and the KV-cache layer indices
(:func:`remove_blocks`).
"""
from .find import residual_blocks
from .rank import block_influence
from .remove import DepthReport, remove_blocks

__all__ = ["DepthReport", "block_influence", "remove_blocks", "residual_blocks"]
