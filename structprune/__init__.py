"""structprune: structured pruning of PyTorch models with one call.

>>> import structprune as sp
>>> small = sp.slim(model, example_input, ratio=0.5)
"""
from .api import SlimReport, slim, slim_with_report
from .attributes import register_size_attribute
from .criteria import ScoringContext, get_criterion, register_criterion
from .errors import (ExampleInputError, InvalidModelError, InvalidRatioError, StructPruneError, TraceError,
                     VerificationError)
from .graph import DependencyGraph, Group
from .io import LoadError, load, save
from .masks import apply_masks, remove_masks, sparsify, sparsity_report, to_semi_structured
from .metrics import count_macs, count_parameters, latency_ms
from .plan import Plan, PlanOptions, Planner
from .regularizers import regularizer
from .report import Report, report
from .rules import rule
from .schedules import Iterative, OneShot, Pruner, Step
from .shrink import updater
from .timing import LotteryTicket, SoftPruner
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
