"""What a DP run tells its user while it runs: progress lines, what a resume restored, why a run did nothing.

:class:`RunLog` is attached by :class:`~monai_dp.engines.DPSupervisedTrainer` after every handler it was built with
(so its ``STARTED``/``COMPLETED`` handlers run after MONAI's ``CheckpointLoader`` and the metrics handler).
"""

from __future__ import annotations

import time
from typing import Any

from ignite.engine import Events

from monai_dp.utils.keys import DPKeys
from monai_dp.utils.validation import check_positive_int, error_message

__all__ = ["PROGRESS_SECONDS", "RunLog", "check_progress_interval", "describe_history"]

PROGRESS_SECONDS = 30.0  # progress_interval="auto": a line once this long has passed since the last one


def check_progress_interval(value: Any) -> int | str | None:
    """``"auto"``, ``None`` or an int >= 1 (iterations between progress lines)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(error_message("progress_interval", "'auto', None or an int >= 1", value))  # noqa: TRY004
    return check_positive_int("progress_interval", value)


def describe_history(history: list) -> str:
    """``"σ = 1.1, q = 0.01"`` of an accountant history ``[(σ, q, steps), ...]`` (ranges where they changed)."""
    def span(values: list[float]) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:.4g}" if lo == hi else f"{lo:.4g} to {hi:.4g}"

    return f"σ = {span([float(h[0]) for h in history])}, q = {span([float(h[1]) for h in history])}"


class RunLog:
    """Log lines for the user of a :class:`~monai_dp.engines.DPSupervisedTrainer` (logger: the trainer's).

    - every ``progress_interval`` iterations of an epoch (``"auto"``: at the first iteration that ends at least
      :data:`PROGRESS_SECONDS` after the epoch started or the last line; ``None``: never), a progress line with the
      epoch, the iteration, the DP steps so far and the seconds per iteration;
    - when a run continues an accounting (a checkpoint restored, the history of loaded weights), at its first
      iteration (or its end, if it takes none): the steps restored, their σ and q, the ε already spent, and the σ
      of this run's steps; ``state.dp_noise_multiplier`` / ``dp_sample_rate`` then hold the σ and q of the last
      step accounted until this run's first step;
    - when a run ends without taking a step and not because of the budget: why (``max_epochs`` already reached).
    """

    def __init__(self, progress_interval: int | str | None = "auto") -> None:
        self.progress_interval = check_progress_interval(progress_interval)
        self._iterations = 0
        self._announced = False
        self._last = 0.0
        self._epoch_start = 0.0

    def attach(self, engine: Any) -> None:
        for event, method in ((Events.STARTED, self.started), (Events.EPOCH_STARTED, self.epoch_started),
                              (Events.ITERATION_STARTED, self.iteration_started),
                              (Events.ITERATION_COMPLETED, self.iteration_completed),
                              (Events.COMPLETED, self.completed)):
            if not engine.has_event_handler(method, event):
                engine.add_event_handler(event, method)

    def started(self, engine: Any) -> None:
        self._iterations, self._announced = 0, False
        self._publish_last_mechanism(engine)

    def epoch_started(self, engine: Any) -> None:
        self._epoch_start = self._last = time.perf_counter()

    def iteration_started(self, engine: Any) -> None:
        if not self._announced:
            self._announce_resume(engine)

    def iteration_completed(self, engine: Any) -> None:
        self._iterations += 1
        state = engine.state
        length = state.epoch_length or 0
        within = (state.iteration - 1) % length + 1 if length else state.iteration
        if self.progress_interval is None or within == length:  # the epoch's end has its own lines
            return
        now = time.perf_counter()
        if self.progress_interval == "auto":
            if now - self._last < PROGRESS_SECONDS:
                return
        elif within % self.progress_interval:
            return
        self._last = now
        engine.logger.info("Epoch %d/%d: iteration %d/%s, %d DP steps so far, %.3g s per iteration.", state.epoch,
                           state.max_epochs, within, length or "?", engine.privacy.steps,
                           (now - self._epoch_start) / within)

    def completed(self, engine: Any) -> None:
        if not self._announced:
            self._announce_resume(engine)
        if not self._iterations:
            self._publish_last_mechanism(engine)
        if self._iterations or getattr(engine.state, DPKeys.BUDGET_EXHAUSTED, False):
            return
        state = engine.state
        if state.max_epochs is not None and state.epoch >= state.max_epochs:
            engine.logger.info("No DP step taken in this run: the trainer is already at epoch %d of max_epochs = %d "
                               "(%d steps accounted, e.g. restored from a checkpoint). Raise max_epochs to train "
                               "further.", state.epoch, state.max_epochs, engine.privacy.steps)
        else:
            engine.logger.info("No DP step taken in this run (epoch %d of max_epochs = %s, epoch_length = %s).",
                               state.epoch, state.max_epochs, state.epoch_length)

    def _announce_resume(self, engine: Any) -> None:
        """Log what this run continues from: the accounted steps before its first one (none: nothing to say)."""
        self._announced = True
        priv = engine.privacy
        history = list(priv.accountant.history)
        if not history or self._iterations:
            return
        now = f"σ = {priv.noise_multiplier:.4g}"
        engine.logger.info("Continuing an accounting of %d steps (%s), ε = %.4g at δ = %.3g so far; this run's steps "
                           "use %s%s.", priv.steps, describe_history(history), priv.get_epsilon(), priv.delta, now,
                           "" if float(history[-1][0]) == priv.noise_multiplier else
                           " (this trainer's σ, not the restored one; both are accounted)")

    @staticmethod
    def _publish_last_mechanism(engine: Any) -> None:
        """Before this run's first step, ``dp_noise_multiplier``/``dp_sample_rate`` are those of the last step taken."""
        history = engine.privacy.accountant.history
        if history:
            setattr(engine.state, DPKeys.NOISE_MULTIPLIER, float(history[-1][0]))
            setattr(engine.state, DPKeys.SAMPLE_RATE, float(history[-1][1]))
