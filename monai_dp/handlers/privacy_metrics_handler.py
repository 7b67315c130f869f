"""PrivacyMetricsHandler: publish the privacy spent, at every epoch end (or every N iterations).

It was called ``PrivacyAccountantHandler`` (it publishes, it does not account); that name stays a deprecated alias
of the same class for one release.
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events

from monai_dp.handlers.utils import require_dict, require_dp_engine
from monai_dp.utils.keys import DPKeys
from monai_dp.utils.validation import check_open_unit_interval, check_positive_int, error_message

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

    With ``clipped_fraction_key`` it also writes, after every epoch, the fraction of that epoch's items (records or
    patients) whose gradient norm exceeded ``max_grad_norm`` (they were scaled down) into
    ``engine.state.metrics[clipped_fraction_key]`` (NaN for an epoch without items); the trainer's clipper counts
    them where the per-item norms are known (:class:`~monai_dp.networks.AutoClipper`, ``items_clipped`` /
    ``items_seen``). Near 1, nearly every gradient is clipped (the update is a mean of directions, and a larger
    ``max_grad_norm`` only adds noise); near 0, the clip norm is larger than it needs to be (see docs/recipes.md).
    It is off by default: the count is exact, not noised, so like the training loss it is outside the (ε, δ)
    guarantee, and the key should say so (the bundles use ``dp_clipped_fraction_NOT_PRIVATE``). In a
    multi-process run each process counts its own items.

    Args:
        delta: δ at which ε is reported; default: the trainer's ``target_delta``.
        epsilon_key: the metrics key.
        iteration_interval: also publish ε every this many iterations; ``None``: at epoch ends only.
        clipped_fraction_key: the metrics key of the per-epoch fraction of clipped items; ``None``: not published.
    """

    def __init__(self, delta: float | None = None, epsilon_key: str = DPKeys.EPSILON,
                 iteration_interval: int | None = None, clipped_fraction_key: str | None = None) -> None:
        if delta is not None:
            check_open_unit_interval("delta", delta)
        if iteration_interval is not None:
            check_positive_int("iteration_interval", iteration_interval)
        if clipped_fraction_key is not None and not (isinstance(clipped_fraction_key, str) and clipped_fraction_key):
            raise ValueError(error_message("clipped_fraction_key", "a non-empty str or None", clipped_fraction_key))
        self.delta = delta
        self.epsilon_key = epsilon_key
        self.iteration_interval = iteration_interval
        self.clipped_fraction_key = clipped_fraction_key
        self._engine: Any = None
        self._pending: dict | None = None
        self._epoch_counts = (0, 0)

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
        if self.clipped_fraction_key is not None:
            if not hasattr(getattr(engine, "clipper", None), "items_clipped"):
                raise RuntimeError(error_message("engine", "a DP trainer whose clipper counts clipped items "
                                                 "(DPSupervisedTrainer)", type(engine).__name__,
                                                 "Pass clipped_fraction_key=None for this engine."))
            for event, method in ((Events.EPOCH_STARTED, self._epoch_started),
                                  (Events.EPOCH_COMPLETED, self.publish_clipped_fraction)):
                if not engine.has_event_handler(method, event):
                    engine.add_event_handler(event, method)

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_counts = (engine.clipper.items_seen, engine.clipper.items_clipped)

    def publish_clipped_fraction(self, engine: Engine) -> None:
        """Write the fraction of this epoch's items that were clipped into ``metrics[clipped_fraction_key]``."""
        seen = engine.clipper.items_seen - self._epoch_counts[0]
        clipped = engine.clipper.items_clipped - self._epoch_counts[1]
        engine.state.metrics[self.clipped_fraction_key] = clipped / seen if seen else float("nan")

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
