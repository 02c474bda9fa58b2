"""Op rules. Importing this package registers every built-in rule."""
from . import attention, conv, elementwise, layout, linear, norm, zoo  # noqa: F401  (registration side effects)
from .context import RuleContext
from .registry import has_module_rule, lookup, op_name, rule

__all__ = ["RuleContext", "has_module_rule", "lookup", "op_name", "rule"]
