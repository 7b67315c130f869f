"""The privacy budget of the app: one ledger, one budget for the studies it trains on, shared by its models.

Every model this app trains learns from the same annotations (the studies' final labels), so every training run
of every model is charged to one budget in one privacy ledger (``--conf ledger``, default
``<model_dir>/privacy_ledger.db``) under one dataset id (``--conf dataset_id``, default ``monailabel-studies``).
The id stays the same while annotations are added: a fingerprint of the labelled records would change with each
new label and hand out a fresh budget for records that were already trained on. The budget (``--conf
target_epsilon``, ``--conf target_delta``, ``--conf privacy_unit``) is registered on the first start and never
changes afterwards (the ledger refuses a different one).

Patient level (``--conf privacy_unit patient``) needs each record's patient id, which MONAI Label does not pass
(its records are ``{image, label}``). The bundle's trainer derives it: with ``--conf patient_id_pattern REGEX``
from the image path (the group ``patient``, else the first group, else the whole match), without it from the
PatientID of DICOM images. A train request whose records yield no ids is refused before anything runs.
"""

from __future__ import annotations

import json
import math
import os
import re
from types import SimpleNamespace
from typing import NamedTuple

from monai_dp.data.patients import patient_ids_of
from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.utils.errors import PrivacyBudgetExhaustedError
from monai_dp.utils.validation import error_message

__all__ = ["DEFAULT_DATASET_ID", "PrivacySettings", "budget_refusal", "bundle_privacy_overrides", "check_budget_left",
           "check_step_fits", "last_report", "model_status", "patient_ids", "privacy_settings", "register_budget",
           "run_note"]

DEFAULT_DATASET_ID = "monailabel-studies"
DEFAULT_DELTA = 1e-5
RUN_NOTE = "monailabel model={model} records={records} n={n}"
UNITS = ("record", "patient")
HOW_IN_THIS_APP = ("In this app: start it with `--conf privacy_unit patient --conf patient_id_pattern REGEX` (REGEX "
                   "finds the id in each image path, e.g. '(?P<patient>pat[0-9]+)_'), or serve DICOM studies (their "
                   "PatientID is read); or use `--conf privacy_unit record`.")


class PrivacySettings(NamedTuple):
    ledger: str
    dataset_id: str
    target_epsilon: float
    target_delta: float
    unit: str
    patient_id_pattern: str | None = None


def _number(conf: dict, key: str, default: float) -> float:
    raw = conf.get(key, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(error_message(key, "a positive finite number", raw, f"Pass e.g. `--conf {key} {default}`."))
    return value


def privacy_settings(conf: dict, model_dir: str, default_epsilon: float) -> PrivacySettings:
    """The budget from the app's ``--conf`` values (``default_epsilon``: the bundle's ``target_epsilon``)."""
    unit = conf.get("privacy_unit", "record")
    if unit not in UNITS:
        raise ValueError(error_message("privacy_unit", "'record' or 'patient'", unit,
                                       "Pass `--conf privacy_unit patient` (with `--conf patient_id_pattern`) or "
                                       "`--conf privacy_unit record`."))
    pattern = conf.get("patient_id_pattern") or None
    if pattern is not None:
        if unit != "patient":
            raise ValueError(error_message(
                "patient_id_pattern", "unset at record level", pattern,
                "Add `--conf privacy_unit patient` to train at patient level, or drop the pattern."))
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(error_message("patient_id_pattern", "a valid regular expression", pattern,
                                           str(err))) from None
    delta = _number(conf, "target_delta", DEFAULT_DELTA)
    if not delta < 1:
        raise ValueError(error_message("target_delta", "in (0, 1)", delta))
    ledger = os.path.realpath(os.path.expanduser(conf.get("ledger") or os.path.join(model_dir, "privacy_ledger.db")))
    return PrivacySettings(ledger, conf.get("dataset_id") or DEFAULT_DATASET_ID,
                           _number(conf, "target_epsilon", default_epsilon), delta, unit, pattern)


def bundle_privacy_overrides(settings: PrivacySettings) -> dict:
    """The bundle overrides that put a run under the app's budget: unit, δ, dataset id, and how patient ids are
    derived (``patient_id_pattern``; ``None`` reads DICOM PatientID). The ledger is the app's handler, not the
    bundle's."""
    return {"target_delta": settings.target_delta, "privacy_unit": settings.unit, "dataset_id": settings.dataset_id,
            "ledger": None, "patient_id_pattern": settings.patient_id_pattern}


def patient_ids(settings: PrivacySettings, records: list) -> list[str]:
    """The patient id of each of MONAI Label's ``records`` as the bundle's trainer derives it (the pattern over the
    image path, else DICOM PatientID); raises ``ValueError`` with the trainer's message and how to give ids in this
    app when a record yields none."""
    try:
        return patient_ids_of(SimpleNamespace(data=records), "patient_id", settings.patient_id_pattern)
    except ValueError as err:
        raise ValueError(f"Patient-level training refused, nothing was trained: {err} {HOW_IN_THIS_APP}") from None


def register_budget(settings: PrivacySettings) -> None:
    """Create the ledger and register the budget on first use; a different recorded budget raises."""
    os.makedirs(os.path.dirname(settings.ledger), exist_ok=True)
    with PrivacyLedger(settings.ledger) as ledger:
        ledger.init_dataset(settings.dataset_id, settings.target_epsilon, settings.target_delta, settings.unit,
                            description="MONAI Label studies (final labels), all models of the app")


def run_note(model: str, records: str, n: int) -> str:
    """The note stored with a ledger run: which model trained, on which records (their fingerprint) and how many."""
    return RUN_NOTE.format(model=model, records=records, n=n)


def _run_view(run: dict) -> dict:
    keys = ("run_id", "status", "note", "steps_taken", "charged_steps", "noise_multiplier", "sample_rate",
            "max_grad_norm", "sampling", "started_at", "ended_at")
    return {k: run.get(k) for k in keys}


def last_report(path: str) -> dict | None:
    """The privacy report of a model's last training (ε of its final weights, their history composed), if any."""
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        return None
    keys = ("epsilon", "delta", "steps", "noise_multiplier", "sample_rate", "accountant", "unit", "date")
    return {k: report.get(k) for k in keys}


def model_status(settings: PrivacySettings, model: str, report_file: str | None = None) -> dict:
    """What ``/info`` shows for ``model``: the shared budget, what is spent and left, the ledger's runs, and the
    report of the model's last training (``report_file``; ``None`` before the first)."""
    with PrivacyLedger(settings.ledger, create=False, read_only=True) as ledger:
        summary = ledger.summary(settings.dataset_id)[0]
    spent, budget = summary["committed_epsilon"], summary["budget_epsilon"]
    runs = [_run_view(r) for r in summary["runs"]]
    prefix = run_note(model, "", 0).split(" records=")[0] + " "
    return {
        "dataset_id": settings.dataset_id, "privacy_unit": summary["unit"], "delta": summary["budget_delta"],
        "epsilon_budget": budget, "epsilon_spent": spent, "epsilon_left": max(budget - spent, 0.0),
        "exhausted": not spent < budget, "ledger": settings.ledger,
        "model_runs": [r for r in runs if str(r["note"]).startswith(prefix)], "runs": runs,
        "last_training": last_report(report_file) if report_file else None,
        "accounting": "PLD composition of every run of every model of this app on the studies' labels, at delta",
    }


def check_budget_left(settings: PrivacySettings) -> dict:
    """Raise :class:`PrivacyBudgetExhaustedError` when nothing of the budget is left; the ledger summary else."""
    with PrivacyLedger(settings.ledger, create=False) as ledger:
        ledger.recover(settings.dataset_id)
        summary = ledger.summary(settings.dataset_id)[0]
    spent, budget = summary["committed_epsilon"], summary["budget_epsilon"]
    if not spent < budget:
        raise PrivacyBudgetExhaustedError(
            f"Privacy budget exhausted: the annotations of dataset {settings.dataset_id!r} have spent ε = {spent:.4g} "
            f"of ε = {budget:g} (δ = {summary['budget_delta']:g}, {summary['unit']} level) over "
            f"{len(summary['runs'])} runs; training is refused and the model is left unchanged. "
            "These annotations cannot be trained on again; images of other patients in another studies folder "
            "can have a budget of their own (`--conf dataset_id`).")
    return summary


def check_step_fits(settings: PrivacySettings, noise_multiplier: float, sample_rate: float) -> None:
    """Raise :class:`PrivacyBudgetExhaustedError` (the ledger's message) if not one step of (σ, q) fits the budget.

    A dry run of what the trainer's ledger handler asks before its first step; nothing is reserved.
    """
    with PrivacyLedger(settings.ledger, create=False) as ledger:
        ledger.check_run(settings.dataset_id, noise_multiplier, sample_rate, 1, settings.unit)


def budget_refusal(err: BaseException) -> PrivacyBudgetExhaustedError | None:
    """The :class:`PrivacyBudgetExhaustedError` behind ``err`` (a bundle run wraps it in its own errors), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, PrivacyBudgetExhaustedError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
