"""The MONAI Label app's train task at patient level (apps/monailabel_dp/lib/trainers), without a server.

Needs monailabel (skipped otherwise): the task is built on a bundle of the repository and its request checks and
bundle overrides are called directly, with a datastore that lists {image, label} records as MONAI Label does.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("monailabel", reason="monailabel is not installed (see docs/monailabel.md for the install)")

_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT / "apps" / "monailabel_dp"))
from lib.privacy import privacy_settings, register_budget  # noqa: E402
from lib.trainers import DPBundleTrainTask  # noqa: E402

pytestmark = pytest.mark.label

BUNDLE = _ROOT / "bundles" / "dp_classification_2d"


class _Datastore:
    def __init__(self, records):
        self.records = records

    def datalist(self):
        return [dict(r, extra="meta") for r in self.records]


def _records(tmp_path):
    return [{"image": str(tmp_path / f"pat{p}_{k}.nii.gz"), "label": str(tmp_path / "labels" / f"pat{p}_{k}.nii.gz")}
            for p, k in [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "a")]]


def _task(tmp_path, **conf):
    settings = privacy_settings(conf, str(tmp_path / "model"), default_epsilon=8.0)
    register_budget(settings)
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("models", "data", "eval", "__pycache__"))
    return DPBundleTrainTask(str(copy), {}, "dp_classification_2d", settings)


def test_patient_level_request_without_ids_is_refused_before_anything_runs(tmp_path):
    task = _task(tmp_path, privacy_unit="patient")
    with pytest.raises(ValueError, match=r"Patient-level training refused, nothing was trained: .*"
                                         r"--conf privacy_unit patient --conf patient_id_pattern REGEX"):
        task({"model": "dp_classification_2d", "val_split": 0.2}, _Datastore(_records(tmp_path)))
    assert not (Path(task.bundle_path) / "models").exists()  # nothing was trained or written


def test_patient_level_overrides_carry_the_unit_and_pattern(tmp_path):
    pattern = r"(?P<patient>pat[0-9]+)_"
    task = _task(tmp_path, privacy_unit="patient", patient_id_pattern=pattern)
    request = {"model": "dp_classification_2d", "val_split": 0.2}
    task._check_budget(request, _Datastore(_records(tmp_path)))  # ids derived: not refused
    train, val = task._partition_datalist(task._fetch_datalist(request, _Datastore(_records(tmp_path))), request)
    c = task.const
    task._request = request
    out = task._update_overrides({c.key_train_dataset_data(): train, c.key_validate_dataset_data(): val,
                                  c.key_train_handlers(): task.bundle_config.get(c.key_train_handlers(), [])})
    assert (out["privacy_unit"], out["patient_id_pattern"]) == ("patient", pattern)
    assert out["datalist"]["training"] == train


def test_patient_level_dry_check_samples_patients_not_images(tmp_path):
    # 4 training images of 2 patients, batch 1: q = 1/2 (one step: ε ≈ 3.53 at σ = 1), not 1/4 (ε ≈ 2.71)
    from monai_dp.utils.errors import PrivacyBudgetExhaustedError

    task = _task(tmp_path, privacy_unit="patient", patient_id_pattern=r"(pat[0-9]+)_", target_epsilon="3")
    request = {"model": "dp_classification_2d", "val_split": 0.2, "noise_multiplier": 1.0, "batch_size": 1}
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"sample_rate = 0.5"):
        task._check_budget(request, _Datastore(_records(tmp_path)))
