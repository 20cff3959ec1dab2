"""`joint`: backbone and every head trained together from random initialisation (the conventional method)."""
from regimes.base import Budget, Phase, Schedule
from regimes.registry import register_schedule


@register_schedule
class Joint(Schedule):
    name = "joint"
    description = "P2 for E epochs from random init: backbone and heads together"

    def phases(self, budget: Budget) -> list[Phase]:
        return [Phase("P2", "all", budget.epochs)]
