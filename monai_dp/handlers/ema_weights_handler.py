"""EMAWeightsHandler: an exponential moving average of the DP iterates, validated and checkpointed in their place.

Averaging the iterates of DP-SGD cancels part of the noise that every step adds, and usually gives a more
accurate model than the last iterate (De et al. 2022). It costs no privacy: the average is a function of the
released (noisy) iterates only, i.e. post-processing of the mechanism the accountant already covers. The handler
reads the network's parameters after each step and never touches gradients, noise, sampling or accounting.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_dp.engines.digest import weights_digest
from monai_dp.handlers.utils import require_dict
from monai_dp.utils.errors import DPConfigurationError
from monai_dp.utils.validation import error_message

__all__ = ["EMAWeightsHandler"]


def _checked_settings(decay: Any, start_step: Any, decay_name: str, start_name: str) -> tuple[float, int]:
    """``decay`` in ``[0, 1)`` and ``start_step`` an int >= 0 (from the arguments or a loaded state)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(error_message(decay_name, "a number in [0, 1)", decay,
                                       "Use 0.9-0.999; 0 keeps the last iterate."))
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not start_step >= 0:
        raise ValueError(error_message(start_name, "an int >= 0", start_step))
    return float(decay), start_step


class EMAWeightsHandler:
    """Keep ``average = decay * average + (1 - decay) * weights`` after every training iteration.

    Attached to the trainer (``train_handlers`` or ``handler.attach(trainer)``), it updates the average on
    ``ITERATION_COMPLETED`` (one iteration of ``DPSupervisedTrainer`` is one noisy logical step). With an
    ``evaluator`` (e.g. the one a ``ValidationHandler`` runs) it also copies the average into ``network`` when the
    evaluator starts and puts the training iterate back when it completes, so the evaluator's metrics and the
    ``CheckpointSaver`` of the evaluator's handlers (best key metric) see the averaged weights, while training
    continues from its own iterate. For the first ``start_step`` steps the average is the iterate itself; the
    ``m``-th step after them uses ``min(decay, (1 + m) / (10 + m))`` (the usual warm-up of an EMA, as in
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), so the early, far-off iterates do not linger.

    Args:
        network: the trained module (its parameters and floating-point buffers are averaged).
        decay: weight of the old average, in ``[0, 1)``; ``0`` keeps the last iterate. Its horizon is about
            ``1 / (1 - decay)`` steps.
        evaluator: optional engine that should see the averaged weights while it runs.
        start_step: steps before the averaging starts (the average follows the iterate until then).
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.99, evaluator: Engine | None = None,
                 start_step: int = 0) -> None:
        if not isinstance(network, torch.nn.Module):
            raise TypeError(error_message("network", "a torch.nn.Module", type(network).__name__))
        decay, start_step = _checked_settings(decay, start_step, "decay", "start_step")
        self.network, self.decay, self.evaluator, self.start_step = network, decay, evaluator, start_step
        self.average = [t.detach().clone() for t in self._tensors()]
        self.num_updates = 0
        self._stash: list[torch.Tensor] | None = None
        self._expected_iterate: str | None = None  # digest a loaded state must find in ``network`` (checked lazily)

    def _tensors(self) -> list[torch.Tensor]:
        buffers = [b for b in self.network.buffers() if b.is_floating_point()]
        return [p for p in self.network.parameters()] + buffers

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self.update, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
            # before a step changes the weights, after any checkpoint loader has run (on STARTED)
            engine.add_event_handler(Events.ITERATION_STARTED, self._check_loaded)
        ev = self.evaluator
        if ev is not None and not ev.has_event_handler(self.swap_in, Events.STARTED):
            ev.add_event_handler(Events.STARTED, self.swap_in)
            ev.add_event_handler(Events.COMPLETED, self.swap_out)
            ev.add_event_handler(Events.EXCEPTION_RAISED, self._swap_out_and_raise)

    def _swap_out_and_raise(self, engine: Engine, e: BaseException) -> None:
        """An evaluator that fails leaves the training iterate in ``network``, not the average."""
        self.swap_out()
        raise e

    def _check_loaded(self, engine: Engine | None = None) -> None:
        """A loaded average belongs to the training run whose iterate it was saved with: refuse it beside other
        weights (an average of another run or data set would enter the evaluated and saved model unaccounted)."""
        if self._expected_iterate is None:
            return
        current = weights_digest(self.network)
        if current != self._expected_iterate:
            raise DPConfigurationError(error_message(
                "EMAWeightsHandler state", f"saved beside the weights now in the network ({current[:12]}…)",
                f"a state saved beside other weights ({self._expected_iterate[:12]}…)",
                "Load the EMA state from the same checkpoint as the model and trainer, or build a fresh handler."))
        self._expected_iterate = None

    def __call__(self, engine: Engine | None = None) -> None:
        self.update(engine)

    @torch.no_grad()
    def update(self, engine: Engine | None = None) -> None:
        """Fold the current weights into the average."""
        if self._stash is not None:
            raise RuntimeError("EMAWeightsHandler.update() was called while the averaged weights are swapped in; "
                               "call swap_out() first.")
        self._check_loaded()
        self.num_updates += 1
        m = self.num_updates - self.start_step
        decay = min(self.decay, (1 + m) / (10 + m)) if m > 0 else 0.0
        for avg, t in zip(self.average, self._tensors()):
            avg.mul_(decay).add_(t.detach().to(avg.dtype), alpha=1.0 - decay)

    @torch.no_grad()
    def swap_in(self, engine: Engine | None = None) -> None:
        """Put the averaged weights into ``network`` (the training iterate is kept aside)."""
        if self._stash is not None:
            return
        self._check_loaded()
        tensors = self._tensors()
        self._stash = [t.detach().clone() for t in tensors]
        for t, avg in zip(tensors, self.average):
            t.copy_(avg)

    @torch.no_grad()
    def swap_out(self, engine: Engine | None = None) -> None:
        """Put the training iterate back into ``network``."""
        if self._stash is None:
            return
        for t, kept in zip(self._tensors(), self._stash):
            t.copy_(kept)
        self._stash = None

    def state_dict(self) -> dict[str, Any]:
        swapped = self._stash is not None  # saved while the average is swapped in: digest the stashed iterate
        self.swap_out()
        try:
            digest = weights_digest(self.network)
        finally:
            if swapped:
                self.swap_in()
        return {"average": [a.clone() for a in self.average], "num_updates": self.num_updates, "decay": self.decay,
                "start_step": self.start_step, "iterate_digest": digest}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = require_dict(state_dict)
        average = state.get("average")
        if not isinstance(average, list) or [tuple(a.shape) for a in average] != [tuple(a.shape) for a in self.average]:
            shapes = [tuple(a.shape) for a in average] if isinstance(average, list) else type(average).__name__
            raise ValueError(error_message("state_dict['average']", "tensors shaped like the network's weights",
                                           shapes, "Load the state of a handler built on the same network."))
        digest = state.get("iterate_digest")
        if not isinstance(digest, str):
            raise ValueError(error_message("state_dict['iterate_digest']", "the digest of the weights it was saved "
                                           "beside", type(digest).__name__,
                                           "Load a state saved by this version of EMAWeightsHandler."))
        decay, start_step = _checked_settings(state.get("decay", self.decay), state.get("start_step", self.start_step),
                                              "state_dict['decay']", "state_dict['start_step']")
        for mine, theirs in zip(self.average, average):
            mine.copy_(theirs)
        # a resumed run goes on averaging as it was saved (like the other handlers, the state wins over arguments)
        self.num_updates = int(state.get("num_updates", 0))
        self.decay, self.start_step = decay, start_step
        self._expected_iterate = digest
