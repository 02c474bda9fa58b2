"""Everything structprune knows about one op family, in one file per family.

Importing this package registers every built-in op. A contributor adds an op by writing one rule
(and, for a module class, its shape function, updater, width attribute and input axes) in the
family's file; ``list_ops()`` lists what is registered.
"""
# registration side effects: every family registers its specs on import
from . import (  # noqa: F401
               activation,
               arithmetic,
               attention,
               broadcast,
               contraction,
               conv,
               embedding,
               indexing,
               join_split,
               linear,
               norm,
               permute,
               queries,
               recurrent,
               reduction,
               reshape,
               routing,
               spatial,
               transformer_layers,
)
from .context import RuleContext
from .registry import (
               OpSpec,
               find_updater,
               has_module_rule,
               input_axis,
               is_weighted,
               list_ops,
               lookup,
               module_spec,
               op_name,
               override,
               register_op,
               register_when_imported,
               rule,
               shape_function_for,
               strict_rules,
               traced_forward_for,
               updater,
               weighted_layers,
               width_of,
)
from .thirdparty import timm, transformers  # noqa: F401  (classes by name: neither library is imported)

# torchvision's rules are keyed by its functions: registered once torchvision is imported, not at start-up
register_when_imported("torchvision", "structprune.ops.thirdparty.torchvision")

__all__ = ["OpSpec", "RuleContext", "find_updater", "has_module_rule", "input_axis", "is_weighted", "list_ops",
           "lookup", "module_spec", "op_name", "override", "register_op", "register_when_imported", "rule",
           "shape_function_for", "strict_rules", "traced_forward_for", "updater", "weighted_layers", "width_of"]
