"""Every exception structprune raises.

Each error says what was wrong and what to do about it. All of them derive from
:class:`StructPruneError`; those that correspond to a classic Python error also derive from it
(``ValueError``/``TypeError``), so generic handlers keep working.
"""
from __future__ import annotations


class StructPruneError(Exception):
    """Base class of every error raised by structprune."""


class InvalidOptionError(StructPruneError, ValueError):
    """An option of a public function has a value it cannot take (the message says what to pass)."""


class InvalidRatioError(InvalidOptionError):
    """A pruning ratio or fraction is not a number in its allowed range."""


class InvalidModelError(StructPruneError, TypeError):
    """The object handed in is not an ``nn.Module``."""


class ExampleInputError(StructPruneError, ValueError):
    """The example input has an unsupported type or the model cannot run on it."""


class TraceError(StructPruneError):
    """Neither torch.fx nor torch.export could capture the model's graph."""


class VerificationError(StructPruneError):
    """The pruned model does not reproduce the original with the dropped channels zeroed."""


class RuleError(StructPruneError):
    """An op rule returned a label that does not fit its node's output, under strict rule checking
    (``STRUCTPRUNE_STRICT_RULES=1`` or ``structprune.ops.strict_rules()``); outside it the op's
    channels are frozen instead."""


class LoadError(StructPruneError):
    """A saved model cannot be loaded: missing, damaged, or made for another model."""
