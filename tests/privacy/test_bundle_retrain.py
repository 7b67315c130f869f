"""A bundle retrained the way MONAI Label's ``BundleTrainTask`` retrains it: its datalist replaced by the datastore's
``{image, label}`` records, a ``CheckpointLoader`` of ``models/model.pt`` inserted first into ``train#handlers``,
run through MONAI's bundle runner. The model's ε composes across retrains, the bundle's ledger (beside the models,
the dataset registered on first use) refuses a run once the dataset's budget is spent, and the dataset id is that
of the records actually trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from monai_dp.privacy.accountants import create_accountant
from monai_dp.privacy.fingerprint import dataset_fingerprint_of_records
from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.utils.errors import PrivacyBudgetExhaustedError

REPO = Path(__file__).resolve().parents[2]
NAME = "dp_classification_2d"
TINY = {"synthetic_items": 40, "synthetic_size": 32, "image_size": [32, 32], "batch_size": 8}
SIGMA = 1.2


def _parser(root: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "train.json"))
    parser.config.update({"bundle_root": str(root)})  # as BundleTrainTask._load_bundle_config
    return parser


def _datastore(root: Path) -> tuple[list[dict], list[dict]]:
    """The records MONAI Label would pass: image and label only, split 80/20 in order (partition_dataset)."""
    from monai.data import partition_dataset

    parser = _parser(root)
    parser.update(TINY)
    datalist = parser.get_parsed_content("datalist")
    records = [{"image": r["image"], "label": r["label"]} for r in datalist["training"] + datalist["validation"]]
    train, val = partition_dataset(records, ratios=[0.8, 0.2], shuffle=False)
    return train, val


def _monai_label_train(root: Path, train: list[dict], val: list[dict], **extra) -> None:
    """BundleTrainTask.__call__ with pretrained=True, single GPU: its overrides, its CheckpointLoader."""
    from monai.bundle import run

    parser = _parser(root)
    handlers = parser.get("train#handlers", [])
    model_pt = root / "models" / "model.pt"
    if model_pt.exists():
        handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(model_pt),
                            "load_dict": {"model": "$@network"}, "strict": False})
    overrides = {"bundle_root": str(root), "train#trainer#max_epochs": 1, "train#dataset#data": train,
                 "device": torch.device("cpu"), "train#handlers": handlers, "validate#dataset#data": val}
    run(run_id="run", init_id=None, final_id=None, meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "train.json"), logging_file=str(root / "configs" / "logging.conf"),
        **overrides, **TINY, **extra)


@pytest.mark.bundle
@pytest.mark.slow
def test_monai_label_retrains_compose_and_the_ledger_refuses_when_spent(tmp_path):
    root = tmp_path / NAME
    shutil.copytree(REPO / "bundles" / NAME, root, ignore=shutil.ignore_patterns("models", "eval"))
    train, val = _datastore(root)
    q = TINY["batch_size"] / len(train)
    steps = int(1 / q)  # the Poisson loader's epoch: 1 / q steps
    acc = create_accountant("prv")
    delta = min(1e-5, 1 / (10 * len(train)))
    acc.step(SIGMA, q, steps + steps // 2)
    budget = acc.get_epsilon(delta)  # room for one run and half of the next
    dp = {"noise_multiplier": SIGMA, "target_epsilon": budget}

    _monai_label_train(root, train, val, **dp)
    first = json.loads((root / "models" / "privacy_report.json").read_text())
    dataset_id = dataset_fingerprint_of_records(train, "patient_id")
    assert first["dataset_id"] == dataset_id, "the id of the records MONAI Label passed"
    default = _parser(root)
    default.update(TINY)
    assert first["dataset_id"] != default.get_parsed_content("dataset_fingerprint"), "not the bundle's own datalist"
    ledger = PrivacyLedger(root / "models" / "privacy_ledger.db", create=False)
    assert ledger.dataset_ids() == [dataset_id] and ledger.budget(dataset_id) == (budget, delta)
    model = torch.load(root / "models" / "model.pt", weights_only=True)
    assert set(model) == {"model", "privacy"} and first["steps"] == steps
    assert sum(n for *_, n in model["privacy"]["accountant"]["history"]) == steps, "the accounting of these weights"

    _monai_label_train(root, train, val, **dp)  # retrain from model.pt, same data
    second = json.loads((root / "models" / "privacy_report.json").read_text())
    own = second["steps"] - steps
    assert second["prior"][0]["steps"] == steps and 0 < own <= steps // 2 + 1
    acc = create_accountant("prv")
    acc.step(SIGMA, q, second["steps"])
    assert second["epsilon"] == pytest.approx(acc.get_epsilon(delta), rel=1e-9), "both runs, composed"
    assert first["epsilon"] < second["epsilon"] <= budget
    assert json.loads((root / "models" / "metadata.json").read_text())["privacy"]["epsilon"] == second["epsilon"]
    spent = ledger.spent(dataset_id).epsilon
    assert spent <= budget and spent > first["epsilon"] * 1.05, "the ledger composes the runs on this dataset"

    with pytest.raises(RuntimeError) as refused:  # the bundle runner wraps what the run raised
        _monai_label_train(root, train, val, **dp)
    cause = refused.value
    while cause is not None and not isinstance(cause, PrivacyBudgetExhaustedError):
        cause = cause.__cause__
    assert cause is not None and "is exhausted" in str(cause), refused.value
    report = json.loads((root / "models" / "privacy_report.json").read_text())
    assert report["epsilon"] == second["epsilon"], "the refused run trained nothing and left the model's report"
