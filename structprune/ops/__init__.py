"""Everything structprune knows about one op family, in one file per family.

Importing this package registers every built-in op. A contributor adds an op by writing one rule
(and, for a module class, its shape function, updater and width attribute) in the family's file.
"""
from . import activation, attention, conv, linear, norm, reshape  # noqa: F401  (registration side effects)
from .thirdparty import torchvision  # noqa: F401
from .context import RuleContext
from .registry import has_module_rule, lookup, op_name, rule

__all__ = ["RuleContext", "has_module_rule", "lookup", "op_name", "rule"]
