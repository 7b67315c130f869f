"""The privacy budget of a training job: one object that plans, accounts and decides every step.

A :class:`PrivacyPlan` is what a job means to spend (σ, q, δ, the planned steps, the cap ε); it is calibrated
once, over the plan, not over one ``run()``. A :class:`PrivacyBudget` holds the plan, the accountant and a list
of *step gates* (the target ε, a privacy-ledger reservation, a follower rank's share of rank 0's reservation);
:meth:`PrivacyBudget.next_step_verdict` asks them all before a step, and is the one place where "stop before the
step that would exceed" is decided. The budget outlives a trainer: hand it to the next trainer (next round of
federated training, next MONAI Label retrain) or keep training with a larger ``max_epochs``, and ε continues.

What is accounted is what really happens: :meth:`PrivacyBudget.bind` gives the budget a function returning the
(σ, q) in force (the optimizer's ``noise_multiplier``, the sampler's rate), read before every verdict and every
recorded step. The accounting never goes backwards (see :meth:`PrivacyBudget.load_state_dict`).

Pure: no ignite, no ``torch.nn``; the trainer binds the torch-side functions.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from monai_dp.privacy.accountants import create_accountant
from monai_dp.privacy.calibration import calibrate_noise_multiplier
from monai_dp.utils.errors import DPConfigurationError, PrivacyBudgetExhaustedError
from monai_dp.utils.validation import check_sample_rate, error_message

__all__ = ["EpsilonGate", "LedgerGate", "PrivacyBudget", "PrivacyPlan", "StepGate", "Verdict"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PrivacyPlan:
    """The mechanism a job plans to run and for how many steps (σ calibrated over ``planned_steps``)."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    planned_steps: int
    max_grad_norm: float
    num_units: int
    target_epsilon: float | None = None
    accountant: str = "prv"
    unit: str = "record"
    sampling: str = "poisson"

    @classmethod
    def create(cls, *, target_epsilon: float | None, noise_multiplier: float | None, delta: float,
               sample_rate: float, planned_steps: int, accountant: str, max_grad_norm: float, num_units: int,
               unit: str = "record", sampling: str = "poisson", prior_history: tuple = ()) -> PrivacyPlan:
        """A plan from checked settings, calibrating σ over ``planned_steps`` when only ε is given.

        ``prior_history``: ``(σ, q, n)`` entries the job spends before its steps (a release of feature statistics,
        see :mod:`monai_dp.networks.projection`); σ is calibrated so that both together stay within ε.

        Raises :class:`PrivacyBudgetExhaustedError` when ``target_epsilon`` does not allow one step.
        """
        acc = create_accountant(accountant)  # holding the prior entries: both checks below compose them
        for entry in prior_history:
            acc.step(*entry)
        if prior_history and target_epsilon is not None:
            spent = acc.get_epsilon(delta)
            if spent >= target_epsilon:
                raise PrivacyBudgetExhaustedError(error_message(
                    "target_epsilon", "above the ε the releases before training spend", target_epsilon,
                    f"The releases of statistics {list(prior_history)} alone spend ε = {spent:.4g} at δ = {delta:.3g}; "
                    "release with a larger noise_multiplier, or raise the budget."))
        sigma = noise_multiplier
        if sigma is None:
            sigma = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, planned_steps, accountant=accountant,
                                               prior_history=tuple(prior_history))
            logger.info("Calibrated noise_multiplier σ = %.4f for ε = %.3g over %d steps (q = %.4g, δ = %.3g, %s).",
                        sigma, target_epsilon, planned_steps, sample_rate, delta, accountant)
        plan = cls(float(sigma), float(sample_rate), float(delta), int(planned_steps), float(max_grad_norm),
                   int(num_units), None if target_epsilon is None else float(target_epsilon), accountant, unit, sampling)
        if plan.target_epsilon is not None:
            if acc.max_extra_steps(plan.target_epsilon, plan.delta, plan.noise_multiplier, plan.sample_rate, limit=1) < 1:
                raise PrivacyBudgetExhaustedError(error_message(
                    "target_epsilon", "large enough for one step", plan.target_epsilon,
                    f"One step at σ = {plan.noise_multiplier:.4g}, q = {plan.sample_rate:.4g} spends "
                    f"ε = {acc.epsilon_after(plan.delta, plan.noise_multiplier, plan.sample_rate, 1):.4g}; "
                    "raise the budget or the noise multiplier."))
        return plan


class Verdict(NamedTuple):
    """Whether the next step may be taken; when not, which gate refused and the message to log."""

    allowed: bool
    gate: str = ""
    message: str = ""


class StepGate(Protocol):
    """Something that can refuse the next step. ``before_step`` and ``finish`` are optional."""

    name: str

    def verdict(self, budget: PrivacyBudget) -> Verdict: ...


class EpsilonGate:
    """Refuses the step that would take ε past ``target_epsilon`` (at the budget's δ, σ and q in force)."""

    def __init__(self, target_epsilon: float, name: str = "epsilon") -> None:
        self.target_epsilon = float(target_epsilon)
        self.name = name

    def verdict(self, budget: PrivacyBudget) -> Verdict:
        if budget.steps + 1 <= budget.allowed_total_steps(self.target_epsilon):
            return Verdict(True)
        return Verdict(False, self.name, (
            f"Privacy budget reached: ε = {budget.get_epsilon():.4f} after {budget.steps} steps "
            f"(δ = {budget.delta:.3g}); one more step would exceed ε = {self.target_epsilon:.4g}. Stopping training."))


class LedgerGate:
    """A privacy-ledger run: refuses steps beyond its reservation, writes each step before it is taken.

    ``run`` is a :class:`~monai_dp.privacy.ledger_run.LedgerRun` (rank 0) or any object with ``allowed_steps``,
    ``run_id``, ``spent_before``, ``claim_step()`` and ``finish(status)`` (a follower rank's view). The ledger's
    lifecycle (open and reserve: the ledger handler; claim: here, before each step; close: :meth:`finish`) is
    driven by the budget, so no step can be taken unclaimed.
    """

    name = "ledger"

    def __init__(self, ledger: Any, run: Any, dataset_id: str, first_step: int) -> None:
        self.ledger, self.run, self.dataset_id, self.first_step = ledger, run, dataset_id, int(first_step)
        budget_eps, budget_delta = ledger.budget(dataset_id)
        self.info = {
            "path": str(getattr(ledger, "path", "")), "dataset_id": dataset_id, "run_id": run.run_id,
            "budget_epsilon": budget_eps, "budget_delta": budget_delta,
            "spent_before": run.spent_before, "spent_after": None, "reserved_steps": run.allowed_steps,
        }
        self.open = True

    def verdict(self, budget: PrivacyBudget) -> Verdict:
        if not self.open or budget.steps - self.first_step + 1 <= self.run.allowed_steps:
            return Verdict(True)
        return Verdict(False, self.name, (
            f"Privacy ledger: this run used the {self.run.allowed_steps} steps the dataset's remaining budget "
            f"allows (ε = {budget.get_epsilon():.4f} for this run, δ = {budget.delta:.3g}). Stopping training."))

    def before_step(self) -> None:
        if self.open:
            self.run.claim_step()

    def finish(self, status: str, budget: PrivacyBudget) -> None:
        """Close the run (``finished``, ``stopped`` or ``failed``) and record the dataset's new total."""
        if not self.open:
            return
        self.open = False
        self.run.finish(status)
        self.info["spent_after"] = self.ledger.spent(self.dataset_id)[0]
        self.info["status"] = status
        self.info["steps"] = budget.steps - self.first_step


class PrivacyBudget:
    """The accounting and the step gates of one training job; what a checkpoint stores of its privacy.

    The accountant's history is the source of truth: ``steps`` and ε derive from it. Attributes read by handlers
    and reports (``noise_multiplier``, ``sample_rate``, ``delta``, ``target_epsilon``, ``unit``, ...) are the
    mechanism in force; ``plan`` is what was planned.
    """

    def __init__(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self.accountant = create_accountant(plan.accountant)
        self.noise_multiplier, self.sample_rate = plan.noise_multiplier, plan.sample_rate
        self.max_grad_norm, self.delta = plan.max_grad_norm, plan.delta
        self.target_epsilon, self.num_units, self.planned_steps = plan.target_epsilon, plan.num_units, plan.planned_steps
        self.unit, self.sampling = plan.unit, plan.sampling
        self.patients: dict | None = None  # records-per-patient summary, when the records carry patient ids
        self.dataset_id: str | None = None  # fingerprint of the training records, or the id the user gave
        self.noise_seed: int | None = None  # an explicit seed: reproducible noise (recorded, logged)
        self.sampling_seed: int | None = None  # an explicit seed: reproducible sampling (recorded, logged)
        self.secure_mode = False
        self.gates: list[Any] = [] if plan.target_epsilon is None else [EpsilonGate(plan.target_epsilon)]
        self._limits: dict[float, int] = {}  # target ε -> largest total step count within it (σ, q in force)
        self._eps_cache: tuple[int, float, float] | None = None
        self._mechanism: Callable[[], tuple[float, float]] | None = None
        self._digest: Callable[[], str] | None = None
        self._model_digest: Callable[[], str] | None = None
        self.prior: list[dict] = []  # the runs whose weights this job continued from (see compose_prior)
        self.loaded_digests: set[str] = set()  # digests of the weights the last loaded accounting belongs to
        self._rewind: tuple[str, int, int] | None = None  # (checkpoint digest, steps before, steps loaded)

    # ------------------------------------------------------------------ what is in force
    def bind(self, mechanism: Callable[[], tuple[float, float]] | None = None,
             digest: Callable[[], str] | None = None, model_digest: Callable[[], str] | None = None) -> None:
        """Read (σ, q) from ``mechanism()`` before every verdict and step; ``digest()``: the digest of the weights
        and the optimizer state; ``model_digest()``: of the weights alone (what a model file holds)."""
        self._mechanism, self._digest, self._model_digest = mechanism, digest, model_digest

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
        try:
            check_sample_rate(q, "sampler.sample_rate")
        except (TypeError, ValueError) as err:
            raise DPConfigurationError(str(err)) from None
        if self.ledger_gate is not None:
            raise DPConfigurationError(error_message(
                "optimizer.noise_multiplier", f"{self.noise_multiplier:.6g} (the σ this ledger run was charged at)",
                sigma, "A run charged to a privacy ledger keeps one σ; start a new run for another σ."))
        logger.info("Noise multiplier σ %.4g -> %.4g, sample rate q %.4g -> %.4g before step %d: accounted from "
                    "this step on.", self.noise_multiplier, float(sigma), self.sample_rate, float(q), self.steps + 1)
        self.noise_multiplier, self.sample_rate = float(sigma), float(q)
        self._limits.clear()

    # ------------------------------------------------------------------ accounting
    @property
    def steps(self) -> int:
        return self.accountant.steps

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
        """Largest total step count whose ε stays within ``target_epsilon`` (default: the plan's; ``None``: no cap).

        The search runs up to one step past the plan and is cached until the steps reach it (or σ, q or the
        history change), so the check before every step costs nothing.
        """
        target = self.target_epsilon if target_epsilon is None else float(target_epsilon)
        if target is None:
            return None
        cached = self._limits.get(target)
        if cached is None or cached <= self.steps:
            limit = max(self.planned_steps + self.prior_steps - self.steps, 0) + 1
            cached = self.steps + self.accountant.max_extra_steps(target, self.delta, self.noise_multiplier,
                                                                  self.sample_rate, limit=limit)
            self._limits[target] = cached
        return cached

    def next_step_verdict(self) -> Verdict:
        """May the next step be taken? Asks every gate, with the (σ, q) in force; the first refusal wins."""
        self.sync()
        for gate in self.gates:
            verdict = gate.verdict(self)
            if not verdict.allowed:
                return verdict
        return Verdict(True)

    def allows_step(self, target_epsilon: float | None = None) -> bool:
        """Whether the next step passes every gate (and, if given, also stays within ``target_epsilon``)."""
        if target_epsilon is not None and not EpsilonGate(target_epsilon).verdict(self).allowed:
            return False
        return self.next_step_verdict().allowed

    # ------------------------------------------------------------------ gates
    def add_gate(self, gate: Any) -> None:
        """Add a gate; a gate with the name of one already there replaces it."""
        self.gates = [g for g in self.gates if g.name != gate.name] + [gate]

    @property
    def ledger_gate(self) -> LedgerGate | None:
        return next((g for g in self.gates if isinstance(g, LedgerGate) and g.open), None)

    @property
    def ledger_info(self) -> dict | None:
        gate = next((g for g in reversed(self.gates) if isinstance(g, LedgerGate)), None)
        return None if gate is None else gate.info

    def before_step(self) -> None:
        """Called just before a step is taken: gates that write ahead (the ledger) do it now."""
        for gate in self.gates:
            if hasattr(gate, "before_step"):
                gate.before_step()

    def finish(self, status: str) -> None:
        """The run ended (``finished``, ``stopped``, ``failed``): gates that hold something (the ledger) close."""
        for gate in self.gates:
            if hasattr(gate, "finish"):
                gate.finish(status, self)

    def attach_ledger_run(self, ledger: Any, run: Any, dataset_id: str) -> None:
        """Charge this run's steps to ``run`` of ``ledger`` from now on (a :class:`LedgerGate`)."""
        self.add_gate(LedgerGate(ledger, run, dataset_id, self.steps))

    @property
    def reproducible(self) -> bool:
        """Whether noise or sampling came from a given seed (then not private against whoever knows it)."""
        return self.noise_seed is not None or self.sampling_seed is not None

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
            "model_digest": None if self._model_digest is None else self._model_digest(),
            "prior": [dict(p) for p in self.prior],
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
            "dataset_id": self.dataset_id,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the accounting history. The history of any accountant type is accepted (it is mechanism-level).

        Loading fewer steps than this budget has recorded (the weights carry those updates) is allowed only when
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
                from monai_dp.utils.randomness import REPRODUCIBLE_NOISE_WARNING

                setattr(self, key, int(state[key]))
                logger.warning("Resumed accounting includes steps with a fixed %s=%d: %s.", key, state[key],
                               REPRODUCIBLE_NOISE_WARNING)
        if state.get("sampling", "poisson") != "poisson" and self.sampling == "poisson":
            self.sampling = str(state["sampling"])
            logger.warning("Resumed accounting includes steps taken without Poisson sampling.")
        self.prior = [dict(p) for p in state.get("prior") or [] if isinstance(p, dict)]
        self.loaded_digests = {d for d in (state.get("weights_digest"), state.get("model_digest")) if isinstance(d, str)}
        self._limits.clear()
        self._eps_cache = None
        if self._rewind is not None:
            self.check_not_rewound(strict=False)

    @property
    def prior_steps(self) -> int:
        """Steps of the runs this job continued from (composed before its own, see :meth:`compose_prior`)."""
        return sum(int(p.get("steps", 0)) for p in self.prior)

    def compose_prior(self, state: dict, source: str) -> None:
        """Compose the accounting of the runs that produced the weights this job continues from before its own.

        ``state`` is a :meth:`state_dict` saved with those weights (a bundle's ``model.pt``, a trainer checkpoint);
        ``source`` says where it was found. ε from now on is that of both histories together: the weights carry
        every earlier update. Gates that count this run's own steps (the ledger's reservation) keep counting them
        only: the earlier runs were charged to the ledger when they ran.
        """
        self.check_not_rewound()
        if not isinstance(state, dict):
            raise TypeError(error_message("privacy history", "a dict (a budget's state_dict)", type(state).__name__,
                                          f"Found in {source}."))
        if "accountant" not in state:
            raise ValueError(error_message("privacy history", "a dict with an 'accountant' entry", sorted(state),
                                           f"Found in {source}."))
        if state.get("unit", "record") != self.unit:
            raise DPConfigurationError(error_message(
                "privacy history unit", f"{self.unit!r} like this trainer", state.get("unit"),
                f"The weights' earlier training ({source}) protected another unit; its ε does not bound this "
                f"one. Continue at privacy_unit={state.get('unit')!r}."))
        probe = create_accountant(self.accountant.name)
        probe.load_state_dict(dict(state["accountant"], accountant=self.accountant.name))  # validates the entries
        own = self.accountant.state_dict()
        self.accountant.load_state_dict(dict(own, history=probe.state_dict()["history"] + own["history"]))
        for gate in self.gates:
            if hasattr(gate, "first_step"):
                gate.first_step += probe.steps
        self.prior = [*[dict(p) for p in state.get("prior") or [] if isinstance(p, dict)], *self.prior,
                      {"source": str(source), "steps": probe.steps, "model_digest": state.get("model_digest"),
                       "dataset_id": state.get("dataset_id"), "delta": state.get("delta")}]
        if state.get("noise_seed") is not None or state.get("sampling_seed") is not None:
            logger.warning("The weights' earlier training (%s) used a fixed seed: its noise or sampling is "
                           "reproducible by whoever knows the seed.", source)
            for key in ("noise_seed", "sampling_seed"):
                if getattr(self, key) is None and state.get(key) is not None:
                    setattr(self, key, int(state[key]))
        if state.get("sampling", "poisson") != "poisson":
            self.sampling = str(state["sampling"])
        self._limits.clear()
        self._eps_cache = None

    def compose_release(self, release: dict, source: str) -> None:
        """Compose a release of statistics of the training data (one Gaussian mechanism, e.g.
        :meth:`~monai_dp.networks.ProjectedFeatureClassifier.release_statistics`) before this job's steps.

        Unlike :meth:`compose_prior` (earlier runs, charged to the ledger when they ran), a release is charged to
        the ledger by the ledger handler when the run begins (``release["ledger_run"]`` notes it).
        """
        entry = [float(release["noise_multiplier"]), float(release["sample_rate"]), int(release["steps"])]
        self.compose_prior({"accountant": {"accountant": self.accountant.name, "history": [entry]},
                            "unit": release.get("unit", "record"), "noise_seed": release.get("noise_seed"),
                            "dataset_id": self.dataset_id, "delta": self.delta}, source)
        self.prior[-1].update({k: release[k] for k in ("kind", "noise_multiplier", "sample_rate", "clip_norm",
                                                        "num_records", "statistics_digest") if k in release})
        self.prior[-1]["ledger_run"] = None

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
