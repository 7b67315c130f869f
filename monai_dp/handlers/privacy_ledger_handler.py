"""PrivacyLedgerHandler: charge a DP training run to the dataset's privacy budget in the privacy ledger."""

from __future__ import annotations

import logging
import os
from typing import Any

from ignite.engine import Engine, Events

from monai_dp.handlers.utils import require_dict, require_dp_engine
from monai_dp.networks.projection import RELEASE_KIND
from monai_dp.utils.distributed import rank_world
from monai_dp.utils.errors import PrivacyBudgetExhaustedError
from monai_dp.utils.keys import DPKeys
from monai_dp.utils.validation import error_message

__all__ = ["PrivacyLedgerHandler"]

logger = logging.getLogger(__name__)


def open_ledger(ledger: Any, create: bool = False):
    """A :class:`~monai_dp.privacy.ledger.PrivacyLedger` from a path or a ledger object.

    A path must hold a ledger already (``monai-dp ledger init`` creates one) unless ``create``: a training run
    creates a ledger only when asked to (``register=True``), so a ledger that was deleted is not silently replaced
    by an empty one otherwise.
    """
    from monai_dp.privacy.ledger import PrivacyLedger

    if isinstance(ledger, PrivacyLedger):
        return ledger
    if isinstance(ledger, (str, os.PathLike)):
        if create:
            os.makedirs(os.path.dirname(os.path.abspath(os.fspath(ledger))), exist_ok=True)
        return PrivacyLedger(ledger, create=bool(create))
    raise TypeError(error_message("ledger", "a path to the ledger's SQLite file or a PrivacyLedger",
                                  type(ledger).__name__))


class _FollowerRun:
    """Another rank's view of rank 0's ledger run: the same reservation, no writes (rank 0 claims the steps)."""

    run_id = None
    spent_before = None

    def __init__(self, allowed_steps: int) -> None:
        self.allowed_steps = allowed_steps

    def claim_step(self) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class _FollowerLedger:
    path = ""

    def head(self) -> None:
        return None

    def budget(self, dataset_id: str) -> tuple[None, None]:
        return None, None

    def spent(self, dataset_id: str) -> tuple[None, list]:
        return None, []


class PrivacyLedgerHandler:
    """Reserve the run's steps in the ledger at ``STARTED`` and record what it spent when it ends.

    At ``STARTED`` (before the first step) the ledger composes every earlier run on the dataset with this one:
    a run that does not fit is refused with :class:`~monai_dp.utils.errors.PrivacyBudgetExhaustedError`, one
    that partly fits is shortened (the trainer stops when its reservation is used). Every step is written to the
    ledger *before* it is taken (see ``PrivacyBudget.before_step``: the run is one of the budget's gates), so a crash can only over-count. On
    ``COMPLETED`` the run is closed as ``finished`` (or ``stopped`` when a budget ended it) and the head of the
    ledger's hash chain is put in ``engine.privacy.ledger_info["head"]`` (and so in the run report: a copy to
    check the ledger against later); on an exception the trainer closes it as ``failed``. The run records the
    sampling used (``engine.privacy.sampling``) and whether the noise or the sampling was seeded (``engine.privacy.reproducible``).
    The trainer attaches this handler itself when given ``ledger=``.

    Args:
        ledger: the ledger's SQLite file, or a ``PrivacyLedger``.
        dataset_id: the dataset's id in the ledger; default: the trainer's (the fingerprint of its records).
        note: free text stored with the run (e.g. the experiment name).
        register: create the ledger file if it is missing, and register a dataset the ledger does not know yet
            with the trainer's budget: ε = ``target_epsilon``, its δ and unit (a budget, once recorded, never
            changes: a later ``target_epsilon`` does not move it). Bundles keep their ledger this way.
    """

    def __init__(self, ledger: Any, dataset_id: str | None = None, note: str = "", register: bool = False) -> None:
        self.ledger = ledger
        self.dataset_id = dataset_id
        self.note = str(note)
        self.register = bool(register)
        self.run_id: int | None = None
        self._opened: Any = None  # the ledger this run is charged to (rank 0), for its head at the end

    def attach(self, engine: Engine) -> None:
        """Register on ``STARTED`` and ``COMPLETED``; attaching twice does nothing."""
        require_dp_engine(engine)
        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)
        if not engine.has_event_handler(self.completed, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def __call__(self, engine: Engine) -> None:
        self.started(engine)

    def started(self, engine: Engine) -> None:
        priv = engine.privacy
        dataset_id = self.dataset_id or priv.dataset_id
        if dataset_id is None:
            raise ValueError(error_message("dataset_id", "given with a ledger when the records cannot be fingerprinted",
                                           None, "Pass `dataset_id` to the trainer."))
        remaining = max(int(engine.state.max_epochs) * int(engine.state.epoch_length) - int(engine.state.iteration), 0)
        rank, world = rank_world()
        ledger, run, failure = None, None, None
        if rank == 0:  # one run per training job: rank 0 holds the ledger, the others follow its reservation
            try:
                ledger = open_ledger(self.ledger, create=self.register)
                if self.register:
                    self._register(ledger, dataset_id, priv)
                self._charge_releases(ledger, dataset_id, priv)
                run = ledger.begin_run(dataset_id, noise_multiplier=priv.noise_multiplier,
                                       sample_rate=priv.sample_rate, max_grad_norm=priv.max_grad_norm,
                                       planned_steps=max(remaining, 1), unit=priv.unit,
                                       group_size=self._group_size(ledger, dataset_id, priv), note=self.note,
                                       sampling=str(priv.sampling),
                                       noise_seeded=bool(getattr(priv, "reproducible", False)))
            except Exception as err:
                failure = err
        if world > 1:
            import torch.distributed as dist

            shared = [None if run is None else run.allowed_steps, None if failure is None else str(failure)]
            dist.broadcast_object_list(shared, src=0)
            if rank != 0:
                if shared[1] is not None:
                    failure = PrivacyBudgetExhaustedError(f"rank 0: {shared[1]}")
                else:
                    ledger, run = _FollowerLedger(), _FollowerRun(int(shared[0]))
        if failure is not None:
            raise failure
        priv.attach_ledger_run(ledger, run, dataset_id)
        self.run_id, self._opened = run.run_id, ledger
        if run.allowed_steps < remaining:
            engine.logger.warning("Privacy ledger: dataset %r has budget left for %d of the %d planned steps; this "
                                  "run stops after %d steps.", dataset_id, run.allowed_steps, remaining,
                                  run.allowed_steps)

    @staticmethod
    def _register(ledger: Any, dataset_id: str, priv: Any) -> None:
        """Register ``dataset_id`` with the trainer's budget on first use (nothing if the ledger knows it)."""
        if dataset_id in ledger.dataset_ids():
            return
        if priv.target_epsilon is None:
            raise ValueError(error_message(
                "target_epsilon", "given to register a dataset in the ledger on first use", None,
                f"Give `target_epsilon` (the dataset's budget), or register {dataset_id!r} with "
                "`monai-dp ledger init`."))
        try:
            ledger.init_dataset(dataset_id, epsilon=priv.target_epsilon, delta=priv.delta, unit=priv.unit,
                                description="registered on first use by a training run (target_epsilon)")
            logger.info("Privacy ledger %s: dataset %r registered with the budget ε = %g at δ = %.3g (%s level).",
                        ledger.path, dataset_id, priv.target_epsilon, priv.delta, priv.unit)
        except ValueError:
            if dataset_id not in ledger.dataset_ids():
                raise  # another run registered it meanwhile otherwise, and its budget holds

    def _charge_releases(self, ledger: Any, dataset_id: str, priv: Any) -> None:
        """Charge each release of statistics the budget composes and no ledger run holds yet, as a run of one step
        at its (σ, q = 1), before the training run reserves its steps (refused, like a run, if it does not fit)."""
        for prior in priv.prior:
            if prior.get("kind") != RELEASE_KIND or prior.get("ledger_run") is not None:
                continue
            run = ledger.begin_run(dataset_id, noise_multiplier=float(prior["noise_multiplier"]),
                                   sample_rate=float(prior["sample_rate"]), max_grad_norm=float(prior["clip_norm"]),
                                   planned_steps=1, unit=priv.unit, group_size=self._group_size(ledger, dataset_id, priv),
                                   note=f"{prior['kind']} released for {prior['source']}", sampling="full",
                                   noise_seeded=bool(getattr(priv, "reproducible", False)))
            run.claim_step()
            run.finish("finished")
            prior["ledger_run"] = run.run_id
            logger.info("Privacy ledger %s: the release of %s (σ = %.4g, q = 1) is charged to dataset %r as run %d.",
                        ledger.path, prior["source"], prior["noise_multiplier"], dataset_id, run.run_id)

    @staticmethod
    def _group_size(ledger: Any, dataset_id: str, priv: Any) -> int:
        """1, or for a record-level run charged to a patient-level budget, the most records of one patient."""
        if priv.unit == "patient" or ledger.dataset_unit(dataset_id) == "record":
            return 1
        if not priv.patients:
            raise ValueError(
                error_message("ledger", f"a record-unit budget for a run without patient ids (dataset {dataset_id!r})",
                              "a patient-unit budget",
                              "Give every record a patient id (`patient_key`) so the run's patient-level cost "
                              "can be charged, or train with privacy_unit='patient'.")
            )
        return int(priv.patients["max"])

    def completed(self, engine: Engine) -> None:
        status = "stopped" if getattr(engine.state, DPKeys.BUDGET_EXHAUSTED, False) else "finished"
        engine.privacy.finish(status)
        info = engine.privacy.ledger_info
        if info is not None and self._opened is not None:
            info["head"] = self._opened.head()

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict) -> None:
        require_dict(state_dict)
        self.run_id = state_dict.get("run_id")
