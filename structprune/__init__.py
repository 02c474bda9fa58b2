"""structprune: structured pruning of PyTorch models with one call.

>>> import structprune as sp
>>> small = sp.slim(model, example_input, ratio=0.5)
"""
from .slim import SlimReport, slim, slim_with_report
from .surgery.size_attributes import register_size_attribute
from .scoring.criteria import ScoringContext, get_criterion, register_criterion
from .errors import (ExampleInputError, InvalidModelError, InvalidRatioError, StructPruneError, TraceError,
                     VerificationError)
from .graph.dependency_graph import DependencyGraph, Group
from .tools.io import LoadError, load, save
from .masks.sparsify import apply_masks, remove_masks, sparsify, sparsity_report, to_semi_structured
from .tools.metrics import count_macs, count_parameters, latency_ms
from .planning.planner import Plan, PlanOptions, Planner
from .workflows.regularizers import regularizer
from .tools.report import Report, report
from .ops import rule
from .workflows.schedules import Iterative, OneShot, Pruner, Step
from .surgery.shrink import updater
from .workflows.soft import LotteryTicket, SoftPruner
from .verify import VerificationResult

__version__ = "0.1.0"

__all__ = [
    "DependencyGraph", "ExampleInputError", "Group", "InvalidModelError", "InvalidRatioError", "Plan",
    "SlimReport", "StructPruneError", "TraceError", "VerificationError", "VerificationResult", "count_macs",
    "count_parameters", "get_criterion", "latency_ms", "PlanOptions", "Planner", "register_criterion",
    "register_size_attribute", "rule",
    "ScoringContext", "slim",
    "slim_with_report", "updater", "Iterative", "OneShot", "Pruner", "Step", "SoftPruner", "LotteryTicket",
    "regularizer", "sparsify", "sparsity_report", "remove_masks", "apply_masks", "to_semi_structured", "save", "load",
    "LoadError", "Report", "report",
]
