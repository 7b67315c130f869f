"""A MONAI Label app whose models are the monai_dp bundles, trained with differential privacy.

Start it with::

    monailabel start_server --app apps/monailabel_dp --studies STUDIES --conf models dp_segmentation_3d

``--conf`` keys: ``models`` (comma-separated bundle names, or ``all``), ``bundles`` (the folder holding them,
default the repository's ``bundles/``), ``model_dir`` (working copies, weights and ledger; default
``<app>/model``), ``target_epsilon`` / ``target_delta`` / ``privacy_unit`` (the budget of the studies, registered
on first start; default the bundles' smallest ``target_epsilon``, δ = 1e-5, record level), ``patient_id_pattern``
(at ``privacy_unit patient``: a regex finding the patient id in each image path; without it DICOM PatientID is
read), ``dataset_id``
(default ``monailabel-studies``), ``ledger`` (default ``<model_dir>/privacy_ledger.db``), ``skip_trainers``.
See docs/monailabel.md.
"""

from __future__ import annotations

import json
import logging
import os

from lib.bundles import bundle_copies, conf_path
from lib.infers import dp_bundle_infer_task
from lib.privacy import privacy_settings, register_budget
from lib.trainers import DPBundleTrainTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

from monai_dp import __version__ as monai_dp_version

logger = logging.getLogger(__name__)


def _bundle_epsilon(path: str) -> float:
    with open(os.path.join(path, "configs", "train.json")) as f:
        return float(json.load(f)["target_epsilon"])


class DPLabelApp(MONAILabelApp):
    """MONAI Label serving and training the DP bundles under one privacy budget for the studies' annotations."""

    def __init__(self, app_dir: str, studies: str, conf: dict):
        self.bundles = bundle_copies(app_dir, conf)
        model_dir = conf_path(conf, "model_dir", os.path.join(app_dir, "model"))
        self.privacy = privacy_settings(conf, model_dir, min(_bundle_epsilon(p) for p in self.bundles.values()))
        register_budget(self.privacy)
        super().__init__(
            app_dir=app_dir, studies=studies, conf=conf, name="MONAI Label - DP bundles (monai_dp)",
            description="monai_dp bundles trained on the annotations with differentially private SGD",
            version=monai_dp_version,
        )

    def init_infers(self) -> dict:
        return {name: dp_bundle_infer_task(path, self.conf) for name, path in self.bundles.items()}

    def init_trainers(self) -> dict:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        return {name: DPBundleTrainTask(path, self.conf, name, self.privacy) for name, path in self.bundles.items()}

    def init_strategies(self) -> dict:
        return {"random": Random(), "first": First()}

    def info(self) -> dict:
        """MONAI Label's info, plus ``privacy``: per model, the budget of the studies, what is spent and the runs."""
        meta = super().info()
        meta["privacy"] = {name: task.stats()["privacy"] for name, task in self._trainers.items()}
        return meta

    def infer(self, request: dict, datastore=None) -> dict:
        """Inference; a model trained since the server started (``models/model.pt`` appeared) is picked up here."""
        name = request.get("model")
        task = self._infers.get(name)
        if task is not None and not task.is_valid():
            task = self._infers[name] = dp_bundle_infer_task(self.bundles[name], self.conf)
            if not task.is_valid():
                raise MONAILabelException(
                    MONAILabelError.INVALID_INPUT,
                    f"Model {name!r} has no trained weights yet; train it first (POST /train/{name}).")
        return super().infer(request, datastore)
