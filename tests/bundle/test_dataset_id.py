"""The bundles follow the dataset id and patient key policies: the id is the fingerprint of the training records,
and the config's ``patient_key`` reaches ``load_datalist`` (train and inference split the same way)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_dp.data import make_synthetic_dataset
from monai_dp.privacy.fingerprint import dataset_fingerprint_of_records

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.parents[1].name for p in (REPO / "bundles").glob("*/configs/train.json"))


def _dataset_with_key(tmp_path: Path, name: str, key: str) -> str:
    """A tiny synthetic set of the bundle's task and dimension, one list whose int patient ids sit under ``key``
    (validation and test are then split off by patient, and the ids normalised to strings, only under ``key``)."""
    task, dims = name.split("_")[1], int(name.split("_")[2][0])
    root = Path(make_synthetic_dataset(tmp_path / "data", task, dims, num_items=20, size=16))
    spec = json.loads((root / "dataset.json").read_text())
    records = spec.pop("training") + spec.pop("test", [])
    for rec in records:
        rec[key] = int(rec.pop("patient_id").removeprefix("patient"))
    (root / "dataset.json").write_text(json.dumps({**spec, "training": records}))
    return str(root)


def _parser(name: str, config: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / config))
    parser.update({"bundle_root": str(REPO / "bundles" / name), **overrides})
    return parser


def test_every_bundle_is_checked():
    assert len(BUNDLES) >= 4


@pytest.mark.parametrize("name", BUNDLES)
def test_dataset_id_is_the_fingerprint_of_the_training_records_by_patient_key(name, tmp_path):
    data = _dataset_with_key(tmp_path, name, "case")
    train = _parser(name, "train.json", dataset_dir=data, patient_key="case")
    datalist = train.get_parsed_content("datalist")
    cases = {split: {r["case"] for r in recs} for split, recs in datalist.items()}
    assert cases["training"] and not cases["training"] & (cases["validation"] | cases["test"])  # patients whole
    assert cases["test"] and all(isinstance(c, str) for c in cases["training"])  # split and normalised by `case`
    assert train.get_parsed_content("dataset_fingerprint") == dataset_fingerprint_of_records(datalist["training"],
                                                                                            "case")
    everything = [r for recs in datalist.values() for r in recs]
    assert train.get_parsed_content("dataset_fingerprint") != dataset_fingerprint_of_records(everything, "case")
    inference = _parser(name, "inference.json", dataset_dir=data, patient_key="case")
    assert inference.get_parsed_content("datalist") == datalist["test"]
