"""What a site sends the server in the clear with every round: never a fingerprint of its training records."""

from __future__ import annotations

import json

import pytest
from monai.fl.utils.constants import ExtraItems

from monai_dp.fl.algo import DPMonaiAlgo
from monai_dp.fl.client import round_result
from monai_dp.privacy.fingerprint import dataset_fingerprint_of_records
from tests.fl.tiny import BUNDLE, site_overrides, training_records

pytest.importorskip("nvflare", reason="federated tests need NVIDIA FLARE: pip install 'monai_dp[fl]'")
pytestmark = pytest.mark.slow


def test_the_records_fingerprint_is_not_sent_only_an_explicit_dataset_id(tmp_path):
    overrides = site_overrides(tmp_path / "data", seed=3)
    sent, kept = {}, {}
    for given in (None, "hospital-a"):
        algo = DPMonaiAlgo(str(BUNDLE), num_rounds=2, local_epochs=1, target_epsilon=6.0,
                           output_dir=str(tmp_path / f"out-{given}"), dataset_id=given, overrides=overrides)
        algo.initialize(extra={ExtraItems.CLIENT_NAME: "site-a"})
        kept[given] = algo.trainer.privacy.dataset_id  # the site's own (ledger) id
        meta = round_result(algo, 0, trained=False).meta  # what every round's result carries
        sent[given] = json.dumps(meta, default=str)
        report = next(v for v in meta.values() if isinstance(v, dict) and "dataset_id" in v)
        assert report["dataset_id"] == ("site-local" if given is None else given)
        algo.finalize()
    fingerprint = dataset_fingerprint_of_records(training_records(tmp_path / "data", seed=3), "patient_id")
    assert kept == {None: fingerprint, "hospital-a": "hospital-a"}  # the default id is the fingerprint, at the site
    assert all(fingerprint not in text for text in sent.values())
