"""`mixed`: train the backbone alone (P1), then backbone and heads together (P2) — the proposal of
arXiv 2407.14320 ("How to Train Your Multi-Exit Model?")."""
from regimes.base import Budget, Phase, Schedule
from regimes.registry import register_schedule


@register_schedule
class Mixed(Schedule):
    name = "mixed"
    description = "P1 (backbone alone) for E1, then P2 (backbone and heads together) for E2"

    def phases(self, budget: Budget) -> list[Phase]:
        return [Phase("P1", "backbone", budget.first), Phase("P2", "all", budget.second)]
