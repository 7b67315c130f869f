"""PrivacyBudgetHandler: an extra ε cap for a DP trainer (the trainer itself enforces its budget)."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine

from monai_dp.handlers.utils import require_dict, require_dp_engine
from monai_dp.privacy.budget import EpsilonGate
from monai_dp.utils.validation import check_positive

__all__ = ["PrivacyBudgetHandler"]


class PrivacyBudgetHandler:
    """Add a cap ``target_epsilon`` to the trainer's privacy budget (``engine.privacy``).

    The trainer asks its budget before every step (``ITERATION_STARTED``) and stops gracefully before the step
    that would exceed any of its gates: the trainer's own ``target_epsilon``, a ledger reservation, and the cap
    this handler adds. So the smaller cap applies, the budget is never exceeded (not even by one step), and
    training stops without this handler too; ``engine.state.dp_budget_exhausted`` is set and the log says why.

    Args:
        target_epsilon: the cap; ``None`` adds nothing (the trainer's own budget still applies).
        name: kept for compatibility; the trainer's logger reports the stop.
    """

    GATE = "epsilon (PrivacyBudgetHandler)"

    def __init__(self, target_epsilon: float | None = None, name: str | None = None) -> None:
        self.target_epsilon = None if target_epsilon is None else check_positive("target_epsilon", target_epsilon)
        self.name = name
        self._engine: Any = None

    def attach(self, engine: Engine) -> None:
        """Add the cap to the engine's budget; attaching twice does nothing."""
        require_dp_engine(engine)
        self._engine = engine
        self._apply()

    def _apply(self) -> None:
        if self._engine is None:
            return
        budget = self._engine.privacy
        budget.gates = [g for g in budget.gates if g.name != self.GATE]
        if self.target_epsilon is not None:
            budget.add_gate(EpsilonGate(self.target_epsilon, name=self.GATE))

    def state_dict(self) -> dict:
        return {"target_epsilon": self.target_epsilon}

    def load_state_dict(self, state_dict: dict) -> None:
        require_dict(state_dict)
        value = state_dict.get("target_epsilon", self.target_epsilon)
        self.target_epsilon = None if value is None else check_positive("target_epsilon", value)
        self._apply()
