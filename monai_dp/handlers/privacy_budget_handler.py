"""PrivacyBudgetHandler: stop training before the step that would exceed the privacy budget."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from monai.utils import min_version, optional_import

from monai_dp.handlers.utils import require_dict, require_dp_engine
from monai_dp.utils.validation import check_positive

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = ["PrivacyBudgetHandler"]


class PrivacyBudgetHandler:
    """Terminate the trainer at ``ITERATION_STARTED`` when one more step would take ε past the budget.

    The check runs before the step (terminating there keeps that iteration from running), so the budget is
    never exceeded, not even by one step, whatever ``max_epochs`` says. The log says why training stopped and
    ``engine.state.dp_budget_exhausted`` is set to ``True``.

    Args:
        target_epsilon: budget; default: the trainer's ``target_epsilon`` (no budget: the handler does nothing).
            When both are set the smaller one applies.
        name: logger name; default: the engine's logger.
    """

    def __init__(self, target_epsilon: float | None = None, name: str | None = None) -> None:
        self.target_epsilon = None if target_epsilon is None else check_positive("target_epsilon", target_epsilon)
        self.logger = logging.getLogger(name) if name is not None else None
        self.stopped_at: int | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``ITERATION_STARTED``; attaching twice does nothing."""
        require_dp_engine(engine)
        if self.logger is None:
            self.logger = engine.logger
        if not engine.has_event_handler(self, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def _budget(self, engine: Any) -> float | None:
        own, theirs = self.target_epsilon, engine.privacy.target_epsilon
        if own is None or theirs is None:
            return own if theirs is None else theirs
        return min(own, theirs)

    def __call__(self, engine: Engine) -> None:
        budget = self._budget(engine)
        priv = engine.privacy
        within_budget = budget is None or priv.allows_step(budget)
        if within_budget and priv.ledger_allows_step():
            return
        self.stopped_at = priv.steps
        engine.state.dp_budget_exhausted = True
        if not priv.ledger_allows_step():
            self.logger.info("Privacy ledger: this run used the %d steps the dataset's remaining budget allows "
                             "(ε = %.4f for this run, δ = %.3g). Stopping training.",
                             priv.ledger_info["reserved_steps"], priv.get_epsilon(), priv.delta)
        else:
            self.logger.info(
                "Privacy budget reached: ε = %.4f after %d steps (δ = %.3g); one more step would exceed ε = %.4g. "
                "Stopping training.", priv.get_epsilon(), priv.steps, priv.delta, budget,
            )
        engine.state.iteration -= 1  # Ignite counted this iteration before ITERATION_STARTED; it does not run
        engine.terminate()

    def state_dict(self) -> dict:
        return {"target_epsilon": self.target_epsilon, "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict) -> None:
        require_dict(state_dict)
        self.target_epsilon = state_dict.get("target_epsilon", self.target_epsilon)
        self.stopped_at = state_dict.get("stopped_at")
