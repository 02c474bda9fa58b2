"""structprune: structured pruning of PyTorch models with one call.

>>> import structprune as sp
>>> small = sp.slim(model, example_input, ratio=0.5)

The public API, by the question each part answers: what is coupled (:class:`DependencyGraph`),
how to extend what is understood (:func:`rule`, :func:`updater`, :func:`register_size_attribute`),
how important (:func:`register_criterion`, :func:`list_criteria`), how much and where (the options),
when (:class:`Pruner`, :class:`SoftPruner`, :class:`LotteryTicket`, :func:`regularizer`), at which
granularity (:func:`sparsify` and the masks), and around the engine (save/load, reports, metrics).
"""
from .channels import ChannelReport, GroupProposal, InteractivePruning, iter_groups, prune_channels
from .depth import DepthReport, block_influence, remove_blocks, residual_blocks
from .errors import (
                     ExampleInputError,
                     InvalidModelError,
                     InvalidOptionError,
                     InvalidRatioError,
                     LoadError,
                     StructPruneError,
                     TraceError,
                     VerificationError,
)
from .graph.dependency_graph import DependencyGraph, Group
from .masks import (
                     Granularity,
                     Mask,
                     SparsityReport,
                     apply_masks,
                     list_granularities,
                     register_granularity,
                     remove_masks,
                     sparsify,
                     sparsity_report,
                     to_semi_structured,
)
from .ops import OpSpec, RuleContext, list_ops, rule, updater
from .ops.size_names import register_size_attribute
from .options import Options, PlanOptions, PruneOptions, ScoreOptions, TraceOptions
from .piecewise import PiecewiseReport, slim_submodules
from .pipeline import PruningSession
from .planning.planner import Plan, Planner
from .scoring import Criterion, ScoringContext, get_criterion, list_criteria, register_criterion
from .slim import SlimReport, slim, slim_whole_model, slim_with_report
from .tools.io import load, save
from .tools.metrics import count_macs, count_parameters, latency_ms
from .tools.report import Report, report
from .verify import VerificationResult
from .workflows import DistillResult, Iterative, LotteryTicket, OneShot, Pruner, SoftPruner, Step, distill, regularizer

__version__ = "0.1.0"

__all__ = [  # sorted
    "ChannelReport", "Criterion", "DependencyGraph", "DepthReport", "DistillResult", "ExampleInputError", "Granularity",
    "Group", "GroupProposal", "InteractivePruning", "InvalidModelError", "InvalidOptionError", "InvalidRatioError",
    "Iterative", "LoadError", "LotteryTicket", "Mask", "OneShot", "OpSpec", "Options", "PiecewiseReport", "Plan",
    "PlanOptions", "Planner", "PruneOptions", "Pruner", "PruningSession", "Report", "RuleContext", "ScoreOptions",
    "ScoringContext", "SlimReport", "SoftPruner", "SparsityReport", "Step", "StructPruneError", "TraceError",
    "TraceOptions", "VerificationError", "VerificationResult", "apply_masks", "block_influence", "count_macs",
    "count_parameters", "distill", "get_criterion", "iter_groups", "latency_ms", "list_criteria", "list_granularities",
    "list_ops", "load", "prune_channels", "register_criterion", "register_granularity", "register_size_attribute",
    "regularizer", "remove_blocks", "remove_masks", "report", "residual_blocks", "rule", "save", "slim",
    "slim_submodules", "slim_whole_model", "slim_with_report", "sparsify", "sparsity_report", "to_semi_structured",
    "updater",
]
