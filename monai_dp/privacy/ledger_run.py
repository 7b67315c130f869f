"""A run in the privacy ledger: what it may take (:class:`RunPlan`), what it is charged, and the handle
(:class:`LedgerRun`) a trainer claims its steps with. The handle reads and writes through the ledger's
:class:`~monai_dp.privacy.ledger_store.LedgerStore`, not through the ledger."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple, Self

from monai_dp.privacy.ledger_chain import RUN_END_KEYS, append_event
from monai_dp.privacy.ledger_store import now
from monai_dp.privacy.pld import Mechanism, compose_epsilon
from monai_dp.utils.errors import PrivacyBudgetExhaustedError
from monai_dp.utils.validation import check_choice, error_message

if TYPE_CHECKING:
    from monai_dp.privacy.ledger_store import LedgerStore

__all__ = ["LedgerRun", "RunPlan", "Spent"]

FINAL_STATUSES = ("finished", "stopped", "failed")


class RunPlan(NamedTuple):
    """What :meth:`PrivacyLedger.check_run` found: steps that fit, ε before and after them (at the budget δ)."""

    dataset_id: str
    planned_steps: int
    allowed_steps: int
    spent_epsilon: float
    epsilon_after: float
    budget_epsilon: float
    budget_delta: float


class Spent(NamedTuple):
    """ε spent on a data set and the runs that spent it (dicts with their ``charged_steps``)."""

    epsilon: float
    runs: list[dict]


def charged(run: sqlite3.Row | dict, reservations: bool) -> int:
    """Steps a run is charged: its reservation while it runs (if ``reservations``), else the steps it claimed."""
    if reservations and run["status"] == "running":
        return max(run["reserved_steps"], run["steps_taken"])
    return run["steps_taken"]


def canonical(mechanisms: Iterable[Mechanism]) -> tuple[Mechanism, ...]:
    """One term per (σ, q, group) with the steps summed, sorted: the same composition, independent of order."""
    steps: dict[tuple, int] = {}
    for m in mechanisms:
        key = (m.noise_multiplier, m.sample_rate, m.group_size)
        steps[key] = steps.get(key, 0) + m.steps
    return tuple(sorted(Mechanism(s, q, n, g) for (s, q, g), n in steps.items() if n > 0))


def mechanisms(runs: Iterable[sqlite3.Row | dict], reservations: bool = True) -> tuple[Mechanism, ...]:
    """What the runs spent, as a canonical composition (running runs count their reservation if asked)."""
    return canonical(Mechanism(r["noise_multiplier"], r["sample_rate"], charged(r, reservations), r["group_size"])
                     for r in runs)


def composed_epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    return compose_epsilon(canonical(mechanisms), delta)


def run_row(con: sqlite3.Connection, run_id: int) -> dict:
    return dict(con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone())


def end_run(con: sqlite3.Connection, run_id: int, status: str) -> bool:
    """End a running run with ``status`` and chain its end (inside a write transaction); ``False`` if not running."""
    if con.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ? AND status = 'running'",
                   (status, now(), run_id)).rowcount != 1:
        return False
    row = run_row(con, run_id)
    append_event(con, "run_end", {"run_id": run_id, **{k: row[k] for k in RUN_END_KEYS}})
    return True


class LedgerRun:
    """A run reserved by :meth:`PrivacyLedger.begin_run`: claim every step before taking it, then :meth:`finish`.

    As a context manager it finishes the run on exit: ``finished``, ``stopped`` on a
    :class:`PrivacyBudgetExhaustedError`, ``failed`` on any other exception.
    """

    def __init__(self, store: LedgerStore, run_id: int, dataset_id: str, plan: RunPlan):
        self.store, self.run_id, self.dataset_id, self.plan = store, run_id, dataset_id, plan
        self.allowed_steps = plan.allowed_steps
        self.spent_before = plan.spent_epsilon
        self.steps_taken = 0
        self.status = "running"

    def claim_step(self) -> int:
        """Record one more step (committed before the caller takes it) and return the steps claimed so far.

        Raises :class:`PrivacyBudgetExhaustedError` when the reservation is used up, ``RuntimeError`` when the run
        is no longer running.
        """
        if not self.store.claim_step(self.run_id):
            with self.store.read() as con:
                row = run_row(con, self.run_id)
            if row["status"] != "running":
                raise RuntimeError(error_message("run status", "'running' to claim a step", row["status"],
                                                 f"Run {self.run_id} has ended; begin or resume a run."))
            raise PrivacyBudgetExhaustedError(
                f"Run {self.run_id} on dataset {self.dataset_id!r} has taken all {row['reserved_steps']} steps its "
                f"ledger reservation allows (budget ε = {self.plan.budget_epsilon:g}, "
                f"δ = {self.plan.budget_delta:g}); step {row['reserved_steps'] + 1} would exceed the budget.")
        self.steps_taken += 1
        return self.steps_taken

    def finish(self, status: str = "finished") -> None:
        """End the run (``finished``, ``stopped`` or ``failed``): it now counts the steps it claimed."""
        status = check_choice("status", status, FINAL_STATUSES)
        with self.store.write() as con:
            if not end_run(con, self.run_id, status):
                ended = con.execute("SELECT status FROM runs WHERE run_id = ?", (self.run_id,)).fetchone()[0]
                raise RuntimeError(error_message("run status", "'running' to finish it", ended,
                                                 f"Run {self.run_id} has already ended."))
        self.status = status

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.status == "running":
            status = ("finished" if exc is None else
                      "stopped" if isinstance(exc, PrivacyBudgetExhaustedError) else "failed")
            self.finish(status)

    def __repr__(self) -> str:
        return (f"LedgerRun(run_id={self.run_id}, dataset_id={self.dataset_id!r}, steps_taken={self.steps_taken}, "
                f"allowed_steps={self.allowed_steps}, status={self.status!r})")
