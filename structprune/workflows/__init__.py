"""When and how often to prune: schedules, soft pruning, lottery tickets, sparsity regularisers."""
from .lottery import LotteryTicket
from .regularizers import regularizer
from .schedules import Iterative, OneShot, Pruner, Step
from .soft import SoftPruner, zero_channels

__all__ = ["Iterative", "LotteryTicket", "OneShot", "Pruner", "SoftPruner", "Step", "regularizer", "zero_channels"]
