"""How often to prune: schedules, and the :class:`Pruner` that follows one.

A schedule is a small object that turns a final ratio into the *cumulative* fraction of channels
removed after each step (one-shot: one step; linear; Zhu & Gupta's cubic curve
``s_t = s_f + (s_i - s_f) * (1 - t / n)^3``, which removes a lot early, while the network is still
redundant, and little at the end). :class:`Pruner` walks it: each step physically removes the
next increment from the current model (so later steps score the fine-tuned survivors), and the
caller fine-tunes between steps.

    pruner = sp.Pruner(model, x, ratio=0.7, schedule=sp.Iterative(steps=5, curve="cubic"))
    for step in pruner:                  # one increment per iteration
        finetune(pruner.model)           # a new, smaller model each step: rebuild the optimizer
    small = pruner.model
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

from torch import nn

from ..errors import InvalidOptionError
from ..options import Options, check_choice, check_flag, check_fraction, check_integer, require_prunable
from ..planning.patterns import by_name, check_rules_match
from ..slim import SlimReport, slim_whole_model
from ..tools.metrics import count_parameters
from ..tools.progress import progress_bar

CURVES = ("linear", "cubic")


@dataclass(frozen=True)
class OneShot:
    """Everything at once."""

    def cumulative(self, ratio: float) -> List[float]:
        return [ratio]


@dataclass(frozen=True)
class Iterative:
    """``steps`` increments whose cumulative fractions follow ``curve`` from ``initial`` to the ratio."""

    steps: int = 5
    curve: str = "linear"
    initial: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "steps", check_integer("steps", self.steps, low=1, example="steps=5"))
        check_choice("curve", self.curve, CURVES)
        check_fraction("initial", self.initial)

    def cumulative(self, ratio: float) -> List[float]:
        n, s_i = self.steps, self.initial
        if self.curve == "linear":
            return [s_i + (ratio - s_i) * t / n for t in range(1, n + 1)]
        return [ratio + (s_i - ratio) * (1 - t / n) ** 3 for t in range(1, n + 1)]


def increments(cumulative: List[float]) -> List[float]:
    """The per-step fraction of the *remaining* channels that takes the model along ``cumulative``."""
    steps, kept = [], 1.0
    for target in cumulative:
        # going from ``kept`` to 1 - target removes 1 - (1 - target) / kept of what is left (reported per step)
        fraction = 0.0 if kept <= 0 else max(0.0, 1 - (1 - target) / kept)
        steps.append(fraction)
        kept = 1 - target
    return steps


@dataclass
class Step:
    """What one step of a :class:`Pruner` did."""

    index: int  # 1-based
    of: int
    target: float  # cumulative fraction of the original channels removed after this step
    fraction: float  # the same step as a fraction of the channels left before it
    params: int
    report: SlimReport


class Pruner:
    """Prune ``model`` to ``ratio`` along ``schedule``; iterate to run one step at a time.

    Every keyword that :func:`structprune.slim` takes (``criterion``, ``data``, ``scope``...) is
    passed to each step. ``callback(pruner, step)`` runs after every step when :meth:`run` is
    used; ``progress=True`` shows a tqdm bar (if tqdm is installed).
    """

    def __init__(self, model: nn.Module, example_input: Any, ratio: float, *, schedule: Any = None,
                 progress: bool = False, **slim_options):
        self.model = require_prunable(model)
        self.example_input = example_input
        self.ratio = check_fraction("ratio", ratio)
        # a schedule fixes the ratios (and counts them from the original widths itself): no target here
        allowed = [name for name in Options.names() if name not in ("target", "reference_widths")]
        parsed = Options.parse(slim_options, allowed=allowed, caller="Pruner")  # checked now, not at the first step
        check_rules_match(model, parsed.plan.ignore, parsed.plan.ratios)
        if "ignore" in slim_options:  # steps after the first prune copies, which hold none of the caller's instances
            slim_options = {**slim_options, "ignore": by_name(parsed.plan.ignore, model)}
        self.schedule = schedule if schedule is not None else OneShot()
        if not callable(getattr(self.schedule, "cumulative", None)):
            raise InvalidOptionError(f"schedule must be sp.OneShot(), sp.Iterative(...) or an object with a "
                                     f"cumulative(ratio) method, got {self.schedule!r}")
        self.targets = self.schedule.cumulative(self.ratio)
        self.fractions = increments(self.targets)
        self.progress = check_flag("progress", progress)
        self.options = slim_options
        self.steps: List[Step] = []

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self) -> Iterator[Step]:
        bar = progress_bar(len(self), "pruning") if self.progress else None
        reference = None  # the widths before the first step: every target counts from them
        for index, (target, fraction) in enumerate(zip(self.targets, self.fractions), start=1):
            self.model, report = slim_whole_model(self.model, self.example_input, target,
                                                  reference_widths=reference, **self.options)
            # pinned to the first step's widths: each step's target then counts from the original model
            reference = reference or report.widths
            step = Step(index, len(self), target, fraction, count_parameters(self.model), report)
            self.steps.append(step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(removed=f"{target:.0%}", params=f"{step.params:,}")
            yield step
        if bar is not None:
            bar.close()

    def run(self, callback: Optional[Callable[["Pruner", Step], None]] = None) -> nn.Module:
        """Run every step, calling ``callback(self, step)`` after each (e.g. to fine-tune)."""
        for step in self:
            if callback is not None:
                callback(self, step)
        return self.model
