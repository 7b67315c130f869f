"""The privacy accounting state a DP trainer owns: mechanism, accountant, steps taken, budget."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from typing import Any

from monai_dp.privacy import calibrate_noise_multiplier, create_accountant
from monai_dp.utils.errors import DPConfigurationError, PrivacyBudgetExhaustedError
from monai_dp.utils.randomness import REPRODUCIBLE_NOISE_WARNING
from monai_dp.utils.validation import error_message

__all__ = ["PrivacyState"]

logger = logging.getLogger(__name__)


class PrivacyState:
    """Mechanism parameters and accounting of one DP training run.

    The accountant's history is the source of truth: ``steps`` and ε are derived from it, and it is what a
    checkpoint stores, so a resumed run continues the accounting exactly.

    What is accounted is what the trainer really does: :meth:`bind` gives the state a function returning the
    (σ, q) in force (the optimizer's ``noise_multiplier``, the sampler's ``sample_rate``), read before every
    budget check and every recorded step, so a noise schedule or a hand-set ``optimizer.noise_multiplier`` is
    accounted at the σ actually used. The accounting never goes backwards: loading an older history into a
    state that has recorded more steps is refused unless the weights are proven to be that checkpoint's
    (:meth:`bind` also takes a digest of the network and optimizer, stored beside the history).
    """

    def __init__(self, accountant: str, noise_multiplier: float, max_grad_norm: float, sample_rate: float,
                 delta: float, target_epsilon: float | None, num_units: int, planned_steps: int,
                 sampling: str = "poisson", unit: str = "record") -> None:
        self.accountant = create_accountant(accountant)
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.num_units = int(num_units)
        self.planned_steps = int(planned_steps)
        self.sampling = sampling
        self.unit = unit
        self.patients: dict | None = None  # records-per-patient summary, when the records carry patient ids
        self.dataset_id: str | None = None  # fingerprint of the training records, or the id the user gave
        self.ledger_info: dict | None = None  # ledger totals, for the report
        self._ledger: Any = None
        self._ledger_run: Any = None
        self._ledger_first_step = 0
        self._allowed_total: int | None = None
        self._eps_cache: tuple[int, float, float] | None = None
        self.noise_seed: int | None = None  # an explicit seed: reproducible noise (recorded, logged)
        self.sampling_seed: int | None = None  # an explicit seed: reproducible sampling (recorded, logged)
        self.secure_mode = False
        self._mechanism: Callable[[], tuple[float, float]] | None = None
        self._digest: Callable[[], str] | None = None
        self._rewind: tuple[str, int, int] | None = None  # (checkpoint digest, steps before, steps loaded)

    @classmethod
    def create(cls, settings: Any, delta: float, sample_rate: float, num_units: int, planned_steps: int,
               sampling: str, unit: str = "record") -> PrivacyState:
        """Build the state from checked settings, calibrating σ when only ε is given."""
        sigma = settings.noise_multiplier
        if sigma is None:
            sigma = calibrate_noise_multiplier(settings.target_epsilon, delta, sample_rate, planned_steps,
                                               accountant=settings.accountant)
            logger.info("Calibrated noise_multiplier σ = %.4f for ε = %.3g over %d steps (q = %.4g, δ = %.3g, %s).",
                        sigma, settings.target_epsilon, planned_steps, sample_rate, delta, settings.accountant)
        state = cls(settings.accountant, sigma, settings.max_grad_norm, sample_rate, delta, settings.target_epsilon,
                    num_units, planned_steps, sampling, unit)
        if state.target_epsilon is not None and state.accountant.max_extra_steps(
                state.target_epsilon, delta, sigma, sample_rate, limit=1) < 1:
            raise PrivacyBudgetExhaustedError(
                error_message("target_epsilon", "large enough for one step", state.target_epsilon,
                              f"One step at σ = {sigma:.4g}, q = {sample_rate:.4g} spends "
                              f"ε = {state.accountant.epsilon_after(delta, sigma, sample_rate, 1):.4g}; "
                              "raise the budget or the noise multiplier.")
            )
        return state

    # ------------------------------------------------------------------ accounting
    @property
    def steps(self) -> int:
        return self.accountant.steps

    def bind(self, mechanism: Callable[[], tuple[float, float]] | None = None,
             digest: Callable[[], str] | None = None) -> None:
        """Read (σ, q) from ``mechanism()`` before every check and step; ``digest()``: the weights' digest."""
        self._mechanism, self._digest = mechanism, digest

    def sync(self) -> None:
        """Take the (σ, q) in force now; a change is accounted from the next step on (and logged)."""
        self.check_not_rewound()
        if self._mechanism is None:
            return
        sigma, q = self._mechanism()
        if (sigma, q) == (self.noise_multiplier, self.sample_rate):
            return
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (sigma > 0 and math.isfinite(sigma)):
            raise DPConfigurationError(error_message(
                "optimizer.noise_multiplier", "a finite number > 0", sigma, "σ = 0 adds no noise and gives no privacy."))
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < q <= 1:
            raise DPConfigurationError(error_message("sampler.sample_rate", "in (0, 1]", q))
        if self._ledger_run is not None:
            raise DPConfigurationError(error_message(
                "optimizer.noise_multiplier", f"{self.noise_multiplier:.6g} (the σ this ledger run was charged at)",
                sigma, "A run charged to a privacy ledger keeps one σ; start a new run for another σ."))
        logger.info("Noise multiplier σ %.4g -> %.4g, sample rate q %.4g -> %.4g before step %d: accounted from "
                    "this step on.", self.noise_multiplier, float(sigma), self.sample_rate, float(q), self.steps + 1)
        self.noise_multiplier, self.sample_rate = float(sigma), float(q)
        self._allowed_total = None

    def record_step(self) -> None:
        """Account one noisy step of the sampled Gaussian mechanism, at the (σ, q) in force."""
        self.sync()
        self.accountant.step(self.noise_multiplier, self.sample_rate)

    def get_epsilon(self, delta: float | None = None) -> float:
        self.check_not_rewound()
        d = self.delta if delta is None else float(delta)
        if self._eps_cache is not None and self._eps_cache[:2] == (self.steps, d):
            return self._eps_cache[2]
        eps = float(self.accountant.get_epsilon(d))
        self._eps_cache = (self.steps, d, eps)
        return eps

    def allowed_total_steps(self, target_epsilon: float | None = None) -> int | None:
        """Largest total step count whose ε stays within the budget (``None``: no budget)."""
        target = self.target_epsilon if target_epsilon is None else float(target_epsilon)
        if target is None:
            return None
        if target_epsilon is not None and target_epsilon != self.target_epsilon:
            limit = max(self.planned_steps - self.steps, 0) + 1
            return self.steps + self.accountant.max_extra_steps(target, self.delta, self.noise_multiplier,
                                                                self.sample_rate, limit=limit)
        if self._allowed_total is None or self._allowed_total <= self.steps:
            limit = max(self.planned_steps - self.steps, 0) + 1
            self._allowed_total = self.steps + self.accountant.max_extra_steps(
                target, self.delta, self.noise_multiplier, self.sample_rate, limit=limit)
        return self._allowed_total

    def allows_step(self, target_epsilon: float | None = None) -> bool:
        """Whether one more step keeps ε within the budget and the ledger's reservation (checked before the step)."""
        self.sync()
        allowed = self.allowed_total_steps(target_epsilon)
        return (allowed is None or self.steps + 1 <= allowed) and self.ledger_allows_step()

    # ------------------------------------------------------------------ privacy ledger
    def ledger_allows_step(self) -> bool:
        """Whether the ledger's reservation for this run has room for one more step (``True`` without a ledger)."""
        run = self._ledger_run
        return run is None or self.steps - self._ledger_first_step + 1 <= run.allowed_steps

    def attach_ledger_run(self, ledger: Any, run: Any, dataset_id: str) -> None:
        """Charge this run's steps to ``run`` of ``ledger`` from now on."""
        self._ledger, self._ledger_run, self._ledger_first_step = ledger, run, self.steps
        budget_eps, budget_delta = ledger.budget(dataset_id)
        self.ledger_info = {
            "path": str(getattr(ledger, "path", "")), "dataset_id": dataset_id, "run_id": run.run_id,
            "budget_epsilon": budget_eps, "budget_delta": budget_delta,
            "spent_before": run.spent_before, "spent_after": None, "reserved_steps": run.allowed_steps,
        }

    def before_step(self) -> None:
        """Write the step to the ledger before it is taken: a crash can then only over-count."""
        if self._ledger_run is not None:
            self._ledger_run.claim_step()

    def finish_ledger_run(self, status: str) -> None:
        """Close the ledger run (``finished``, ``stopped`` or ``failed``) and record the dataset's new total."""
        run, self._ledger_run = self._ledger_run, None
        if run is None:
            return
        run.finish(status)
        if self.ledger_info is not None:
            self.ledger_info["spent_after"] = self._ledger.spent(self.ledger_info["dataset_id"])[0]
            self.ledger_info["status"] = status
            self.ledger_info["steps"] = self.steps - self._ledger_first_step

    def exhausted_message(self) -> str:
        return (f"Privacy budget ε = {self.target_epsilon:.4g} (δ = {self.delta:.3g}) reached: "
                f"{self.steps} steps spent ε = {self.get_epsilon():.4g}, and one more step would exceed it.")

    def describe(self) -> str:
        budget = "none" if self.target_epsilon is None else f"{self.target_epsilon:.4g}"
        return (f"DP-SGD ({self.unit} level): σ = {self.noise_multiplier:.4g}, C = {self.max_grad_norm:.4g}, "
                f"q = {self.sample_rate:.4g} (N = {self.num_units}), δ = {self.delta:.3g}, ε budget = {budget}, "
                f"accountant = {self.accountant.name}, sampling = {self.sampling}, planned steps = {self.planned_steps}.")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Plain types only, loadable with ``torch.load(weights_only=True)``."""
        self.check_not_rewound()
        return {
            "accountant": self.accountant.state_dict(),
            "weights_digest": None if self._digest is None else self._digest(),
            "noise_seed": self.noise_seed,
            "sampling_seed": self.sampling_seed,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "num_units": self.num_units,
            "sampling": self.sampling,
            "unit": self.unit,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the accounting history. The history of any accountant type is accepted (it is mechanism-level).

        Loading fewer steps than this state has recorded (the weights carry those updates) is allowed only when
        the network and optimizer are loaded from the same checkpoint: its ``weights_digest`` must match the
        weights before the next step, ε query or save (any load order works); else those raise.
        """
        if not isinstance(state, dict) or "accountant" not in state:
            raise ValueError(error_message("privacy state", "a dict with an 'accountant' entry", type(state).__name__))
        if state.get("unit", self.unit) != self.unit:
            raise ValueError(error_message("privacy state['unit']", f"{self.unit!r} like this trainer", state["unit"],
                                           "A checkpoint's accounting cannot be resumed at another privacy unit."))
        acc = dict(state["accountant"])
        acc["accountant"] = self.accountant.name
        probe = create_accountant(self.accountant.name)
        probe.load_state_dict(acc)  # validates before anything changes
        before = max(self.steps, self._rewind[1] if self._rewind else 0)
        if probe.steps < before:
            digest = state.get("weights_digest")
            if not isinstance(digest, str) or self._digest is None:
                raise DPConfigurationError(error_message(
                    "privacy state", f"at least the {before} steps this trainer has taken", f"{probe.steps} steps",
                    "Accounting never goes backwards: the weights carry every update. Load an older checkpoint "
                    "into a new trainer, with its network and optimizer."))
            self._rewind = (digest, before, probe.steps)
        else:
            self._rewind = None
        self.accountant.load_state_dict(acc)
        for key in ("noise_seed", "sampling_seed"):
            if state.get(key) is not None and getattr(self, key) is None:
                setattr(self, key, int(state[key]))
                logger.warning("Resumed accounting includes steps with a fixed %s=%d: %s.", key, state[key],
                               REPRODUCIBLE_NOISE_WARNING)
        if state.get("sampling", "poisson") != "poisson" and self.sampling == "poisson":
            self.sampling = str(state["sampling"])
            logger.warning("Resumed accounting includes steps taken without Poisson sampling.")
        self._allowed_total = None
        self._eps_cache = None
        if self._rewind is not None:
            self.check_not_rewound(strict=False)

    @property
    def reproducible(self) -> bool:
        """Whether noise or sampling came from a given seed (then not private against whoever knows it)."""
        return self.noise_seed is not None or self.sampling_seed is not None

    def check_not_rewound(self, strict: bool = True) -> None:
        """Raise if an older history was loaded while the weights are not that checkpoint's (see load)."""
        if self._rewind is None:
            return
        digest, before, loaded = self._rewind
        if self._digest is not None and self._digest() == digest:
            self._rewind = None
            return
        if strict:
            raise DPConfigurationError(error_message(
                "load_state_dict", "given the network and optimizer of the same checkpoint as the accounting",
                f"an accounting of {loaded} steps on weights that carry {before}",
                "Accounting never goes backwards: load network, optimizer and trainer from one checkpoint "
                "(CheckpointLoader with all three), or resume into a new trainer."))
