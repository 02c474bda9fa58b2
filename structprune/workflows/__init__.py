"""When and how often to prune, and recovering afterwards: schedules, soft pruning, lottery tickets, sparsity
regularisers, distillation."""
from .distill import DistillResult, distill
from .lottery import LotteryTicket
from .regularizers import regularizer
from .schedules import Iterative, OneShot, Pruner, Step
from .soft import SoftPruner, zero_channels

__all__ = ["DistillResult", "Iterative", "LotteryTicket", "OneShot", "Pruner", "SoftPruner", "Step", "distill",
           "regularizer", "zero_channels"]
