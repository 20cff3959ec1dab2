"""`disjoint`: train the backbone alone (P1), then only the heads on the frozen backbone (P3).

Frozen means `requires_grad_(False)` *and* BatchNorm in eval mode (the trainer does both), so neither weights
nor running statistics of the backbone move in P3.
"""
from regimes.base import Budget, Phase, Schedule
from regimes.registry import register_schedule


@register_schedule
class Disjoint(Schedule):
    name = "disjoint"
    description = "P1 (backbone alone) for E1, then P3 (heads only, backbone and its BN statistics frozen) for E3"

    def phases(self, budget: Budget) -> list[Phase]:
        return [Phase("P1", "backbone", budget.first), Phase("P3", "heads", budget.second)]
