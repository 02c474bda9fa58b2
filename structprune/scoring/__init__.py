"""How important is each channel (or weight): the scoring context, the gradient collector and the criteria."""
from .context import GradientCollector, GradientStatistics, ScoringContext, default_loss
from .criteria import Criterion, get_criterion, list_criteria, normalize, register_criterion

__all__ = ["Criterion", "GradientCollector", "GradientStatistics", "ScoringContext", "default_loss", "get_criterion",
           "list_criteria", "normalize", "register_criterion"]
