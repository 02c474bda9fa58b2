"""Lottery tickets (Frankle & Carbin 2019): prune after training, rewind the survivors.

:class:`LotteryTicket` remembers the weights at initialisation (or at an early iteration:
:meth:`LotteryTicket.snapshot`), and after training prunes by a criterion and rewinds the survivors
to those remembered values: channel-wise (a smaller dense model, planned by the pruning session) or
element-wise (the library's own masks, which stay applied while retraining and which
:func:`~structprune.sparsity_report` and :func:`~structprune.remove_masks` see).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..masks import masks, set_mask, sparsify
from ..options import Options, check_choice, check_fraction, check_names, require_module
from ..pipeline import PruningSession
from ..surgery.copying import deep_copy_module

TICKET_GRANULARITIES = ("channel", "element")
ELEMENT_OPTIONS = ("scope", "data", "loss_fn", "seed", "targets")  # what an element ticket's sparsify takes


class LotteryTicket:
    """Remember ``model``'s weights now; after training, prune and rewind the survivors.

    Examples:
        >>> ticket = LotteryTicket(model, x)      # at initialisation
        >>> train(ticket.model)
        >>> small = ticket.prune_and_rewind(0.5)  # survivors back to their initial values; retrain it
    """

    def __init__(self, model: nn.Module, example_input: Any):
        self.model = require_module(model)
        self.example_input = example_input
        self.snapshot()

    def snapshot(self) -> None:
        """Remember the current weights as the rewind point (call at iteration k for late rewinding)."""
        self.rewind_state: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def rewound_copy(self) -> nn.Module:
        """A copy of the model holding the remembered weights."""
        twin = deep_copy_module(self.model)
        twin.load_state_dict(self.rewind_state)
        return twin

    def prune_and_rewind(self, ratio: float, *, granularity: str = "channel", criterion: Any = "l1",
                         **options: Any) -> nn.Module:
        """Prune the trained model and return the winning ticket with its remembered weights.

        ``granularity="channel"``: the channels :func:`structprune.slim` would drop (by ``criterion``,
        with every other option of ``slim``) are removed from a rewound copy: a smaller dense model.
        ``"element"``: the ``ratio`` of lowest-scoring weights of every conv and linear layer (ranked
        globally; ``criterion`` needs an element form) are masked in a rewound copy; the masks keep
        them at zero while retraining.
        """
        check_choice("granularity", granularity, TICKET_GRANULARITIES)
        ratio = check_fraction("ratio", ratio)
        if granularity == "element":
            return self._element_ticket(ratio, criterion, options)
        allowed = [name for name in Options.names() if name not in ("verify", "inplace")]
        session = PruningSession(self.model, self.example_input, Options.parse(
            {"ratio": ratio, "criterion": criterion, **options}, allowed=allowed, caller="prune_and_rewind")
            .replace(verify=False))
        # planned on the trained weights, cut from the rewound copy: the dry run stands in for verification,
        # which cannot compare models holding different values
        return session.apply(session.plan(dry_run=True), onto=self.rewound_copy())[0]

    def _element_ticket(self, ratio: float, criterion: Any, options: Dict[str, Any]) -> nn.Module:
        check_names(options, ELEMENT_OPTIONS, "prune_and_rewind(granularity='element')")
        scored = deep_copy_module(self.model)  # masks are chosen on a copy: the trained model stays as it is
        sparsify(scored, ratio, "element", criterion=criterion, **{"scope": "global", **options})
        twin = self.rewound_copy()
        for name, mask in masks(scored).items():
            path, _, attr = name.rpartition(".")
            set_mask(twin.get_submodule(path), attr, mask.clone(), "element")
        return twin
