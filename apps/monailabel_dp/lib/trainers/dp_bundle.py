"""MONAI Label's ``BundleTrainTask`` for a DP bundle: the annotations are trained on, and every run is charged.

``BundleTrainTask`` already hands the bundle the datastore's final labels (``train#dataset#data``), the device,
``max_epochs`` and a ``CheckpointLoader`` of ``models/model.pt`` (a retrain continues from the served weights).
It injects no ``amp`` and no ``GradScaler``: the bundle's ``DPSupervisedTrainer`` runs as it does under
``monai.bundle run`` (Poisson sampling, per-example clipping, bf16 or no autocast). This subclass adds what the
privacy guarantee needs:

- before anything runs, the app's ledger is asked; with the budget spent the request is refused
  (:class:`~monai_dp.utils.errors.PrivacyBudgetExhaustedError`) and nothing is loaded, trained or written;
- the bundle's whole ``datalist`` is replaced by MONAI Label's split, so the bundle generates no synthetic data
  and everything it derives from its data (the sampling rate, δ checks, the records' fingerprint) is about the
  annotations;
- the run is charged to the app's one budget (``dataset_id``, ``ledger``, ``target_delta``) by a
  ``PrivacyLedgerHandler`` whose note names the model and the fingerprint of the records trained on;
- a retrain continues the model's privacy: every ``CheckpointSaver`` of the network also saves its
  ``PrivacyHistory``, and the trainer looks the loaded ``model.pt`` up in ``models/`` (``privacy_history``), unless
  the bundle does so itself; weights with no history found are refused by the trainer;
- at patient level (``--conf privacy_unit patient``) the bundle gets the app's ``patient_id_pattern`` (``None``:
  DICOM PatientID) and derives each record's patient id; records that yield none refuse the request first;
- a request may set the bundle's training knobs (:data:`REQUEST_KEYS`) but never the budget.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.tasks.train.bundle import BundleTrainTask

from lib.privacy import (
    PrivacySettings,
    budget_refusal,
    bundle_privacy_overrides,
    check_budget_left,
    check_step_fits,
    model_status,
    patient_ids,
    run_note,
)
from monai_dp.privacy.fingerprint import dataset_fingerprint_of_records
from monai_dp.utils.validation import error_message

__all__ = ["REQUEST_KEYS", "DPBundleTrainTask"]

logger = logging.getLogger(__name__)

_HISTORY = {"_target_": "monai_dp.engines.history.PrivacyHistory", "network": "@network"}

# bundle ids a train request may override (the bundle's top-level DP and training knobs)
REQUEST_KEYS = ("batch_size", "learning_rate", "max_grad_norm", "noise_multiplier", "target_epsilon",
                "patch_size", "num_samples", "val_interval", "accountant")


class DPBundleTrainTask(BundleTrainTask):
    """Train the DP bundle at ``path`` as model ``model`` under the app's privacy budget ``privacy``."""

    def __init__(self, path: str, conf: dict, model: str, privacy: PrivacySettings):
        super().__init__(path, conf, load_strict=True)
        self.model, self.privacy = model, privacy
        self._request: dict = {}

    def config(self) -> dict:
        options = super().config()
        options["max_epochs"] = self.bundle_config.get("max_epochs", options["max_epochs"])
        for key in REQUEST_KEYS:
            if key in self.bundle_config.config:
                options[key] = self.bundle_config.config[key]
        options["target_epsilon"] = min(self.privacy.target_epsilon, options.get("target_epsilon") or 1e300)
        return options

    def stats(self) -> dict:
        report = os.path.join(self.bundle_path, "models", "privacy_report.json")
        return {"privacy": model_status(self.privacy, self.model, report)}

    def __call__(self, request: dict, datastore: Any) -> dict:
        self._request = dict(request)
        try:
            self._check_budget(request, datastore)  # refused here: nothing is loaded, trained or written
            super().__call__(request, datastore)
        except Exception as err:
            refused = budget_refusal(err)
            if refused is None or refused is err:
                raise
            raise refused from None  # the budget's own message, not the bundle's wrapping, ends the task's log
        finally:
            self._request = {}
        return self.stats()

    def _check_budget(self, request: dict, datastore: Any) -> None:
        """Refuse when the budget is spent, when a patient-level run's records yield no patient ids, or when one
        step of the requested (σ, q) does not fit what is left (q over patients at patient level)."""
        check_budget_left(self.privacy)
        train, _ = self._partition_datalist(self._fetch_datalist(request, datastore), request)
        units = len(set(patient_ids(self.privacy, train))) if self.privacy.unit == "patient" else len(train)
        sigma = request.get("noise_multiplier", self.bundle_config.config.get("noise_multiplier"))
        batch = request.get("batch_size") or self.bundle_config.config.get("batch_size")
        if not (isinstance(sigma, (int, float)) and isinstance(batch, int)):
            return  # σ calibrated from ε (or an expression): the trainer's ledger handler decides before its first step
        check_step_fits(self.privacy, float(sigma), min(1.0, batch / units))

    def _load_checkpoint(self, model_pytorch: str, pretrained: bool, train_handlers: list) -> None:
        """Continue from ``model.pt`` only when ``pretrained`` (monailabel 0.8.5 fails on ``os.path.exists(None)``)."""
        if pretrained:
            super()._load_checkpoint(model_pytorch, pretrained, train_handlers)

    def _fetch_datalist(self, request: dict, datastore: Any) -> list:
        records = super()._fetch_datalist(request, datastore)
        if not records:
            raise ValueError(error_message(
                "datastore", "holding images with a saved final label", "no final labels",
                "Save labels first (`PUT /datastore/label?image=ID&tag=final`)."))
        return records

    def _update_overrides(self, overrides: dict) -> dict:
        train = overrides[self.const.key_train_dataset_data()]
        val = overrides.get(self.const.key_validate_dataset_data())
        if not val:
            raise ValueError(error_message(
                "val_split", "a fraction that leaves at least one validation record", self._request.get("val_split"),
                f"{len(train)} labelled records were found; label more images or raise `val_split`."))
        overrides["datalist"] = {"training": train, "validation": val, "test": []}
        for key in REQUEST_KEYS:
            if self._request.get(key) is not None:
                overrides[key] = self._request[key]
        eps = overrides.get("target_epsilon", self.privacy.target_epsilon)
        if not 0 < float(eps) <= self.privacy.target_epsilon:
            raise ValueError(error_message("target_epsilon", f"in (0, {self.privacy.target_epsilon:g}] (the budget)",
                                           eps, "A run's ε cannot exceed the app's budget."))
        overrides.update({"target_epsilon": float(eps), **bundle_privacy_overrides(self.privacy)})
        note = run_note(self.model, dataset_fingerprint_of_records(train), len(train))
        ledger = {"_target_": "monai_dp.handlers.PrivacyLedgerHandler", "ledger": self.privacy.ledger,
                  "dataset_id": self.privacy.dataset_id, "note": note}
        overrides[self.const.key_train_handlers()] = _with_history(overrides[self.const.key_train_handlers()]) + [ledger]
        overrides["validate#handlers"] = _with_history(self.bundle_config.get("validate#handlers", []))
        if self.bundle_config.get("train#trainer#privacy_history") is None:
            overrides["train#trainer#privacy_history"] = os.path.join(self.bundle_path, "models")
        logger.info("DP training of %s: %s, charged to dataset %r in %s", self.model, note, self.privacy.dataset_id,
                    self.privacy.ledger)
        return overrides


def _with_history(handlers: list) -> list:
    """``handlers`` with every ``CheckpointSaver`` of the network also saving the network's ``PrivacyHistory``."""
    out = []
    for handler in handlers:
        save = handler.get("save_dict") if isinstance(handler, dict) else None
        if isinstance(save, dict) and handler.get("_target_") == "CheckpointSaver" and "model" in save \
                and "privacy" not in save:
            handler = {**handler, "save_dict": {**save, "privacy": dict(_HISTORY)}}
        out.append(handler)
    return out
