"""Exceptions raised by structprune.

Every error says what was wrong and what to do about it. All of them derive from
:class:`StructPruneError`; the ones that correspond to a classic Python error also derive from it
(``ValueError``/``TypeError``) so generic handlers keep working.
"""
from __future__ import annotations


class StructPruneError(Exception):
    """Base class of every error raised by structprune."""


class InvalidRatioError(StructPruneError, ValueError):
    """The pruning ratio is not a number in [0, 1)."""


class InvalidModelError(StructPruneError, TypeError):
    """The object handed in is not an ``nn.Module``."""


class ExampleInputError(StructPruneError, ValueError):
    """The example input has an unsupported type or the model cannot run on it."""


class TraceError(StructPruneError):
    """Neither torch.fx nor torch.export could capture the model's graph."""


class VerificationError(StructPruneError):
    """The pruned model does not reproduce the original with the dropped channels zeroed."""
