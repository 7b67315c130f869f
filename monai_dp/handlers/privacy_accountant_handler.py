"""PrivacyAccountantHandler: publish the privacy spent after every optimizer step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monai.utils import min_version, optional_import

from monai_dp.handlers.utils import require_dict, require_dp_engine
from monai_dp.utils.validation import error_message

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = ["PrivacyAccountantHandler"]


class PrivacyAccountantHandler:
    """Write ε spent so far into ``engine.state.metrics[epsilon_key]`` after every optimizer step.

    Also sets ``engine.state.dp_steps`` (noisy logical steps taken), ``dp_delta``, ``dp_noise_multiplier``,
    ``dp_sample_rate`` and ``dp_max_grad_norm``, so MONAI's ``StatsHandler``, ``TensorBoardStatsHandler``
    and ``MLFlowHandler`` log them with no extra code (``state_attributes=["dp_steps", ...]``).

    The accounting itself lives in the DP trainer (every noisy step is recorded by the step that takes it,
    so no handler can be forgotten); this handler publishes it and carries it through checkpoints: put it in
    ``CheckpointSaver``'s ``save_dict`` (or save the trainer, whose state holds the same) to resume exactly.

    Args:
        delta: δ at which ε is reported; default: the trainer's ``target_delta``.
        epsilon_key: the metrics key.
    """

    def __init__(self, delta: float | None = None, epsilon_key: str = "epsilon") -> None:
        if delta is not None and not 0 < delta < 1:
            raise ValueError(error_message("delta", "in (0, 1)", delta))
        self.delta = delta
        self.epsilon_key = epsilon_key
        self._engine: Any = None
        self._pending: dict | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``STARTED`` and ``ITERATION_COMPLETED``; attaching twice does nothing."""
        require_dp_engine(engine)
        self._engine = engine
        if self._pending is not None:
            engine.privacy.load_state_dict(self._pending)
            self._pending = None
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        priv = engine.privacy
        engine.state.metrics[self.epsilon_key] = priv.get_epsilon(self.delta)
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
