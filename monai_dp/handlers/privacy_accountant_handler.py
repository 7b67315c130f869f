"""PrivacyAccountantHandler: publish the privacy spent, at every epoch end (or every N iterations)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monai.utils import min_version, optional_import

from monai_dp.handlers.utils import require_dict, require_dp_engine
from monai_dp.utils.validation import check_positive_int, error_message

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = ["PrivacyAccountantHandler"]


class PrivacyAccountantHandler:
    """Write ε spent so far into ``engine.state.metrics[epsilon_key]`` at the start, after every epoch and at the end.

    Every iteration it also sets ``engine.state.dp_steps`` (noisy logical steps taken), ``dp_delta``,
    ``dp_noise_multiplier``, ``dp_sample_rate``, ``dp_max_grad_norm`` and ``dp_epsilon_steps`` (the step
    count at which the published ε was computed), so MONAI's ``StatsHandler``, ``TensorBoardStatsHandler``
    and ``MLFlowHandler`` log them with no extra code (``state_attributes=["dp_steps", ...]``).

    A tight ε (PRV, PLD) takes 0.05-1 s to compute, which can exceed a training step, so by default it is
    computed where MONAI's handlers read metrics (epoch ends); ``iteration_interval=N`` also computes it every
    N iterations. Either way the budget is enforced before every step by the trainer itself (a cached step
    limit), never by this handler.

    The accounting itself lives in the DP trainer (every noisy step is recorded by the step that takes it,
    so no handler can be forgotten); this handler publishes it and carries it through checkpoints: put it in
    ``CheckpointSaver``'s ``save_dict`` (or save the trainer, whose state holds the same) to resume exactly.

    Args:
        delta: δ at which ε is reported; default: the trainer's ``target_delta``.
        epsilon_key: the metrics key.
        iteration_interval: also publish ε every this many iterations; ``None``: at epoch ends only.
    """

    def __init__(self, delta: float | None = None, epsilon_key: str = "epsilon",
                 iteration_interval: int | None = None) -> None:
        if delta is not None and not 0 < delta < 1:
            raise ValueError(error_message("delta", "in (0, 1)", delta))
        if iteration_interval is not None:
            check_positive_int("iteration_interval", iteration_interval)
        self.delta = delta
        self.epsilon_key = epsilon_key
        self.iteration_interval = iteration_interval
        self._engine: Any = None
        self._pending: dict | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``STARTED``, ``ITERATION_COMPLETED``, ``EPOCH_COMPLETED`` and ``COMPLETED``; idempotent."""
        require_dp_engine(engine)
        self._engine = engine
        if self._pending is not None:
            engine.privacy.load_state_dict(self._pending)
            self._pending = None
        if not engine.has_event_handler(self.iteration_completed, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        for event in (Events.STARTED, Events.EPOCH_COMPLETED, Events.COMPLETED):
            if not engine.has_event_handler(self, event):
                engine.add_event_handler(event, self)

    def iteration_completed(self, engine: Engine) -> None:
        """Publish the step counters; ε too when ``iteration_interval`` divides the iteration."""
        if self.iteration_interval is not None and engine.state.iteration % self.iteration_interval == 0:
            self(engine)
        else:
            self._publish_counters(engine)

    def __call__(self, engine: Engine) -> None:
        """Compute and publish ε (and the counters) now."""
        priv = engine.privacy
        engine.state.metrics[self.epsilon_key] = priv.get_epsilon(self.delta)
        engine.state.dp_epsilon_steps = priv.steps
        self._publish_counters(engine)

    def _publish_counters(self, engine: Engine) -> None:
        priv = engine.privacy
        engine.state.dp_steps = priv.steps
        engine.state.dp_delta = priv.delta if self.delta is None else self.delta
        engine.state.dp_noise_multiplier = priv.noise_multiplier
        engine.state.dp_sample_rate = priv.sample_rate
        engine.state.dp_max_grad_norm = priv.max_grad_norm

    def state_dict(self) -> dict:
        """The attached trainer's accounting state (plain types)."""
        if self._engine is not None:
            return self._engine.privacy.state_dict()
        return dict(self._pending or {})

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the accounting; applied at ``attach`` when not attached yet."""
        require_dict(state_dict)
        if self._engine is not None:
            self._engine.privacy.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)
