"""The pruning session: the one place where the stages of a pruning run are wired together.

    capture -> shapes -> walk -> solve      (DependencyGraph: what is coupled)
    -> score                                (Planner + ScoringContext: how important)
    -> plan -> dry run                      (Plan: what to remove, tried on a meta-device twin)
    -> shrink -> verify                     (surgery + Verifier: apply it, check it)

``slim``, ``Pruner``, ``SoftPruner``, ``LotteryTicket``, ``sparsify(granularity="channel")``,
``apply_masks`` and the group-lasso regulariser all run a :class:`PruningSession`, so every option
(``tracer``, ``attention``, ``hidden``, ``ignore``, ...) means the same thing in each of them. Like
torch.ao's sparsifier, the session owns the pipeline and the front ends only choose which stages
to run and what to do with their results.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Optional, Tuple

from torch import nn

from .errors import StructPruneError
from .graph.capture import Inputs
from .graph.dependency_graph import DependencyGraph
from .graph.example_input import check_has_samples
from .options import Options, require_prunable
from .planning.budgets import removed_fraction
from .planning.dry_run import groups_that_break
from .planning.latency import search_latency
from .planning.patterns import check_rules_match
from .planning.planner import Plan, Planner
from .planning.search import search_target
from .scoring import ScoringContext, get_criterion
from .surgery.compensation import Compensation, constant_channels
from .surgery.shrink import rollback, shrink, shrunk_copy
from .verify import VerificationResult, Verifier

DRY_RUN_ROUNDS = 3  # re-plans after a dry run found groups that break the forward


WEIGHT_ONLY_CRITERIA = ("l1", "l2", "magnitude", "fpgm", "bn_scale")


def _is_language_model(model: nn.Module) -> bool:
    """A generative language model: a Hugging Face model that can ``generate`` text from token ids."""
    config = getattr(model, "config", None)
    return callable(getattr(model, "generate", None)) and config is not None and hasattr(config, "vocab_size")


def _warn_if_weights_alone_judge_a_language_model(model: nn.Module, criterion: Any, data: Any) -> None:
    if data is None and isinstance(criterion, str) and criterion in WEIGHT_ONLY_CRITERIA and _is_language_model(model):
        warnings.warn(
            f"pruning a language model by weights alone (criterion={criterion!r}, no data) is unreliable: LLMs route "
            f"their signal through a few feature channels with huge activations that weights do not show (SmolLM2-135M "
            f"with 20% of its parameters removed by 'l2' goes from perplexity 9.8 to 1.5 million). Pass calibration "
            f"batches of token ids, data=[tokens, ...], with criterion='flap' or 'wanda' (their removed channels' "
            f"means are folded into biases too), or 'taylor' with loss_fn=lambda model, batch: model(input_ids=batch, "
            f"labels=batch).loss", UserWarning, stacklevel=2)


class PruningSession:
    """One pruning run over ``model`` for ``example_input`` with ``options``.

    The dependency graph is built on construction (pass ``graph=`` to reuse one built for the same
    model); the later stages run on demand.

    Examples:
        >>> session = PruningSession(model, x, Options.from_kwargs(ratio=0.3))
        >>> plan = session.plan()                     # score, plan, dry run
        >>> small, verdict = session.apply(plan)      # shrink a copy, verify it
    """

    def __init__(self, model: nn.Module, example_input: Any, options: Optional[Options] = None, *,
                 graph: Optional[DependencyGraph] = None):
        self.model = require_prunable(model)
        self.options = options if options is not None else Options()
        self._check_before_tracing(example_input)
        trace = self.options.trace
        self.graph = graph if graph is not None else DependencyGraph(model, example_input, tracer=trace.tracer,
                                                                     attention=trace.attention)
        self._planner: Optional[Planner] = None

    def _check_before_tracing(self, example_input: Any) -> None:
        """Options that cannot work on this model fail before the (slow) capture: an ``ignore`` or ``ratios``
        entry naming no module of the model, and, when verifying, an empty example input."""
        plan = self.options.plan
        check_rules_match(self.model, plan.ignore, plan.ratios)
        if self.options.prune.verify:
            check_has_samples(Inputs.from_example(example_input))

    # ----- score -------------------------------------------------------------------------------------------
    def planner(self, rescore: bool = False) -> Planner:
        """The planner holding every prunable group's scores (``rescore``: score the current weights again)."""
        if self._planner is None or rescore:
            score = self.options.score
            self._check_materialised()
            if self._planner is None:
                _warn_if_weights_alone_judge_a_language_model(self.model, score.criterion, score.data)
            context = self._scoring_context()
            # rescoring keeps the groups a dry run already showed to break: new scores do not make them safe
            excluded = self._planner.excluded if self._planner is not None else set()
            self._planner = Planner(self.graph, context, get_criterion(score.criterion), self.options.plan.ignore)
            self._planner.exclude(excluded)
        return self._planner

    def _scoring_context(self) -> ScoringContext:
        """What the criterion reads (a session whose weights live elsewhere supplies its own)."""
        score = self.options.score
        return ScoringContext(self.model, self.graph, data=score.data, loss_fn=score.loss_fn,
                              reduction=score.reduction, seed=score.seed)

    # ----- plan ----------------------------------------------------------------------------------------------
    def plan(self, dry_run: Optional[bool] = None) -> Plan:
        """The plan for the options: a ratio, or a bisection to the ``target`` budget; then (by default when
        verifying, and always under torch.export, whose literals may hide widths read from tensors) a dry
        run on the meta device, re-planning around the groups whose pruning breaks the forward."""
        planner = self.planner()
        plan = self._plan_once(planner)
        if dry_run is None:
            dry_run = self.options.prune.verify or self.graph.trace.tracer == "export"
        # re-plan after each exclusion: under global scope the freed share goes to other layers, which may break
        # in turn; the rounds are bounded, and verification stays the last line
        for _ in range(DRY_RUN_ROUNDS if dry_run else 0):
            broken = groups_that_break(self.model, self.graph, plan.drops,
                                       lambda drops: Plan(dict(drops)).element_mask(self.graph))
            if not broken:
                break
            planner.exclude(broken)
            self.graph.notes.extend(
                f"group {gid} ({self.graph.groups[gid].spaces[0]}) was kept whole: pruning it breaks the forward "
                f"({error}); a width the graph does not show (such as C // num_heads under torch.export) "
                f"depends on it" for gid, error in broken.items())
            plan = self._plan_once(planner)
        return plan

    def _plan_once(self, planner: Planner) -> Plan:
        options = self.options.plan
        budget = options.budget
        if budget is None:
            return planner.plan(options)
        kind, fraction = budget
        if kind == "latency":
            plan, removed = search_latency(planner, options, fraction)
            self.graph.notes.append(f"latency target {fraction:.0%}: the plan measured {1 - removed:.3f}x the dense "
                                    f"latency (goal {1 - fraction:.3f}x)")
            return plan
        return search_target(planner, options, removed_fraction(kind, self.graph, self.model), fraction)[0]

    # ----- shrink and verify -----------------------------------------------------------------------------------
    def apply(self, plan: Plan, *, onto: Optional[nn.Module] = None) -> Tuple[nn.Module, Optional[VerificationResult]]:
        """Remove the planned channels: from a copy, or from the model itself with ``inplace`` (restored if
        anything fails). With ``verify`` the result is checked against the zeroed original.

        ``onto`` shrinks another model of the same structure instead (a lottery ticket's rewound copy);
        its values differ from the scored model's, so it is never verified against it.
        """
        dropped = plan.element_mask(self.graph)
        notes = self.graph.notes
        if onto is not None:
            # no verifier: the zeroed reference is the scored model's, and ``onto`` holds other values
            return shrunk_copy(onto, self.graph, dropped, notes), None
        prune = self.options.prune
        compensation = self.compensation()
        deltas = compensation.deltas(self.graph, dropped) if compensation is not None else {}
        # built before shrinking: its reference runs the captured graph, whose modules an in-place shrink changes
        verifier = Verifier(self.graph, dropped, compensation) if prune.verify else None
        # the check runs inside the rollback, so a failed verification restores an in-place model too
        with rollback(self.model) if prune.inplace else contextlib.nullcontext():
            if prune.inplace:
                shrink(self.model, self.graph, dropped, notes)
            pruned = self.model if prune.inplace else shrunk_copy(self.model, self.graph, dropped, notes)
            Compensation.fold(pruned, deltas, notes)
            verdict = verifier.check(pruned) if verifier is not None else None
        return pruned, verdict

    def compensation(self) -> Optional[Compensation]:
        """The bias compensation to apply: the calibration means of the removed inputs with ``data``, else the
        values of the channels that are constant whatever the input (None: ``compensate=False``)."""
        if not self.options.prune.compensate:
            return None
        if self.options.score.data is not None:
            return Compensation.from_statistics(self.graph, self.planner().context.activations())
        inputs = self.graph.inputs.cloned()
        return Compensation.from_statistics(self.graph, constant_channels(self.model, inputs.args, inputs.kwargs))

    def pruned_groups(self, plan: Plan) -> Dict[int, Tuple[int, int]]:
        """Group id -> (units before, units after) for every group the plan shrinks."""
        return {gid: (self.graph.groups[gid].n_units, self.graph.groups[gid].n_units - len(units))
                for gid, units in plan.drops.items()}

    def _check_materialised(self) -> None:
        """Weights on the meta device can be planned but neither scored by magnitude nor run."""
        if not any(t.is_meta for t in self.model.parameters()):
            return
        criterion = self.options.score.criterion
        # 'random' needs no values; a callable criterion is trusted to bring its own scores
        if self.options.prune.verify or (isinstance(criterion, str) and criterion != "random"):
            raise StructPruneError(
                "the model's weights are on the meta device: magnitude criteria and verification need real "
                "values. Load the weights first, or plan with criterion='random' (or your own scores) and "
                "verify=False.")

