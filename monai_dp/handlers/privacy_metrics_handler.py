"""PrivacyMetricsHandler: publish the privacy spent, at every epoch end (or every N iterations).

It was called ``PrivacyAccountantHandler`` (it publishes, it does not account); that name stays a deprecated alias
of the same class for one release.
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events

from monai_dp.handlers.utils import require_dict, require_dp_engine
from monai_dp.utils.keys import DPKeys
from monai_dp.utils.validation import check_open_unit_interval, check_positive_int

__all__ = ["PrivacyMetricsHandler"]


class PrivacyMetricsHandler:
    """Write ε spent so far into ``engine.state.metrics[epsilon_key]`` at the start, after every epoch and at the end.

    Every iteration it also sets the counters of :attr:`DPKeys.COUNTERS <monai_dp.utils.keys.DPKeys>` on
    ``engine.state``: ``dp_steps`` (noisy logical steps taken), ``dp_delta``, ``dp_noise_multiplier``,
    ``dp_sample_rate``, ``dp_max_grad_norm`` and ``dp_epsilon_steps`` (the step count at which the published ε
    was computed), so MONAI's ``StatsHandler``, ``TensorBoardStatsHandler`` and ``MLFlowHandler`` log them with
    no extra code (``state_attributes=list(DPKeys.COUNTERS)``).

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

    def __init__(self, delta: float | None = None, epsilon_key: str = DPKeys.EPSILON,
                 iteration_interval: int | None = None) -> None:
        if delta is not None:
            check_open_unit_interval("delta", delta)
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
        setattr(engine.state, DPKeys.EPSILON_STEPS, priv.steps)
        self._publish_counters(engine)

    def _publish_counters(self, engine: Engine) -> None:
        priv, state = engine.privacy, engine.state
        setattr(state, DPKeys.STEPS, priv.steps)
        setattr(state, DPKeys.DELTA, priv.delta if self.delta is None else self.delta)
        setattr(state, DPKeys.NOISE_MULTIPLIER, priv.noise_multiplier)
        setattr(state, DPKeys.SAMPLE_RATE, priv.sample_rate)
        setattr(state, DPKeys.MAX_GRAD_NORM, priv.max_grad_norm)

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
