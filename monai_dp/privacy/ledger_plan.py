"""Planning a run on the privacy ledger: the request checked against the data set's budget, the largest step
count that fits, and the message that refuses a run."""

from __future__ import annotations

import sqlite3
from typing import Any, NamedTuple

from monai_dp.privacy.ledger_run import RunPlan, charged, composed_epsilon
from monai_dp.privacy.mechanism import Mechanism, largest_passing
from monai_dp.privacy.pld import compose_epsilon, max_steps_within_budget
from monai_dp.utils.validation import check_choice, check_positive, check_positive_int, error_message

__all__ = ["Request", "check_request", "exhausted_message", "plan_run"]

UNITS = ("record", "patient")


class Request(NamedTuple):
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    unit: str
    group_size: int


def check_request(ds: sqlite3.Row, noise_multiplier: Any, sample_rate: Any, planned_steps: Any, unit: Any,
                  group_size: Any) -> Request:
    sigma = check_positive("noise_multiplier", noise_multiplier,
                           "A run without noise cannot be recorded against a privacy budget.")
    q = check_positive("sample_rate", sample_rate)
    if not q <= 1:
        raise ValueError(error_message("sample_rate", "in (0, 1]", sample_rate))
    steps = check_positive_int("planned_steps", planned_steps)
    unit = check_choice("unit", unit, UNITS)
    if unit == ds["unit"]:
        if group_size not in (None, 1):
            raise ValueError(error_message("group_size", f"1 for a {unit}-level run on a {unit}-level budget",
                                           group_size, "group_size is for record-level runs charged to a "
                                           "patient-level budget."))
        return Request(sigma, q, steps, unit, 1)
    if unit == "patient":
        raise ValueError(error_message(
            "unit", f"'record' on data set {ds['dataset_id']!r}, whose budget is record-level", unit,
            "A patient-level run protects patients, not each record of a patient with several records, so its "
            "record-level cost is not bounded by its patient-level ε; register the data set with unit 'patient'."))
    if group_size is None:
        raise ValueError(error_message(
            "group_size", f"the largest number of records per patient for a record-level run on the "
            f"patient-level data set {ds['dataset_id']!r}", group_size,
            "A patient with k records is charged the mixture-of-Gaussians cost of k records."))
    return Request(sigma, q, steps, unit, check_positive_int("group_size", group_size))


def plan_run(ds: sqlite3.Row, req: Request, spent: tuple[Mechanism, ...]) -> RunPlan:
    """The largest step count ≤ planned whose canonical composition with ``spent`` stays within the budget."""
    eps, delta = ds["epsilon"], ds["delta"]
    spent_eps = compose_epsilon(spent, delta)
    n, after = req.planned_steps, composed_epsilon(
        [*spent, Mechanism(req.noise_multiplier, req.sample_rate, req.planned_steps, req.group_size)], delta)
    if after > eps:
        n = max_steps_within_budget(spent, req.noise_multiplier, req.sample_rate, req.group_size, eps, delta,
                                    req.planned_steps)

        def fits(k: int) -> bool:
            return composed_epsilon([*spent, Mechanism(req.noise_multiplier, req.sample_rate, k, req.group_size)],
                                    delta) <= eps

        # the ledger composes same-mechanism runs as one term; make sure that (its reported total) fits too:
        # the largest count up to n that fits, walking down from n (one query when n itself fits)
        n = largest_passing(fits, n, start=n)
        after = composed_epsilon([*spent, Mechanism(req.noise_multiplier, req.sample_rate, n, req.group_size)],
                                 delta) if n else spent_eps
    return RunPlan(ds["dataset_id"], req.planned_steps, n, spent_eps, after, eps, delta)


def exhausted_message(ds: sqlite3.Row, runs: list[sqlite3.Row], spent_eps: float, req: Request) -> str:
    spenders = [r for r in runs if charged(r, True) > 0]
    lines = [(f"Privacy budget of dataset {ds['dataset_id']!r} (ε = {ds['epsilon']:g}, δ = {ds['delta']:g}, "
             f"{ds['unit']}-level) is exhausted: spent ε = {spent_eps:.4g} (PLD composition of {len(spenders)} "
             "run(s); running runs count their reservation). Not a single step of the requested run "
             f"(noise_multiplier = {req.noise_multiplier:g}, sample_rate = {req.sample_rate:g}, "
             f"{req.unit}-level, group_size = {req.group_size}) fits. Runs that spent it:")]
    lines += [f"  run {r['run_id']}: {r['status']}, by {r['user']}@{r['host']}, started {r['started_at']}, "
              f"{charged(r, True)} steps, noise_multiplier = {r['noise_multiplier']:g}, "
              f"sample_rate = {r['sample_rate']:g}, group_size = {r['group_size']}" for r in spenders]
    if spent_eps < ds["epsilon"]:
        lines.append("A run with a larger noise_multiplier or a smaller sample_rate may still fit the rest.")
    return "\n".join(lines)
