"""What a training run records in the privacy ledger (sampling, seeded noise, the chain's head), and refusals."""

from __future__ import annotations

import json
import os
import re
import sqlite3

import pytest

from monai_dp.cli.ledger_text import account_text
from monai_dp.handlers import PrivacyReportHandler
from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.utils.errors import LedgerIntegrityError
from tests.engines.test_ledger_integration import DELTA, _trainer


@pytest.fixture
def path(tmp_path):
    """A ledger with the test data set registered (budget ε = 50)."""
    with PrivacyLedger(tmp_path / "ledger.db") as led:
        led.init_dataset(_trainer(None).privacy.dataset_id, epsilon=50.0, delta=DELTA)
    return tmp_path / "ledger.db"


def test_the_run_records_its_sampling_and_seeded_noise_and_the_report_holds_the_head(path, tmp_path):
    seeded = _trainer(str(path), handlers=[PrivacyReportHandler(str(tmp_path / "report.json"))], noise_seed=7)
    seeded.run()
    fresh = _trainer(str(path))
    fresh.run()
    third = _trainer(str(path), sampling_seed=3)  # replayable sampling is recorded the same way
    third.run()
    led = PrivacyLedger(path, read_only=True)
    runs = led.spent(seeded.privacy.dataset_id).runs
    assert [(r["sampling"], r["noise_seeded"]) for r in runs] == [(seeded.privacy.sampling, 1),
                                                                   (fresh.privacy.sampling, 0), ("poisson", 1)]
    assert seeded.privacy.sampling == "poisson"
    assert "run 1: reproducible noise: not private against someone who knows the seed" in account_text(led.export())
    report_head = json.loads((tmp_path / "report.json").read_text())["ledger"]["head"]
    assert report_head == seeded.privacy.ledger_info["head"] != fresh.privacy.ledger_info["head"] != led.head()
    assert third.privacy.ledger_info["head"] == led.head()
    assert led.verify(expect_head=report_head).expected_at == 4  # genesis, dataset, start and end of run 1


def test_a_trainer_never_creates_a_ledger(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`path` must be an existing ledger file.*monai-dp ledger init"):
        _trainer(str(tmp_path / "ledger.db")).run()
    assert not (tmp_path / "ledger.db").exists()


def test_a_trainer_refuses_an_emptied_ledger(path):
    path.write_bytes(b"")
    trainer = _trainer(str(path))
    with pytest.raises(LedgerIntegrityError, match=rf"'{re.escape(str(path))}' is an empty file \(0 bytes\)"):
        trainer.run()
    assert trainer.dp_steps == 0 and path.stat().st_size == 0


def test_a_trainer_refuses_a_read_only_ledger_naming_the_file(path):
    os.chmod(path, 0o444)
    try:
        trainer = _trainer(str(path))
        with pytest.raises(PermissionError, match=rf"got '{re.escape(str(path))}'\. Its file .* is read-only"):
            trainer.run()
        assert trainer.dp_steps == 0
    finally:
        os.chmod(path, 0o644)


def test_a_trainer_refuses_a_tampered_ledger_before_the_first_step(path):
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("DROP TRIGGER datasets_fixed")
    con.execute("UPDATE datasets SET epsilon = 1000")
    con.close()
    trainer = _trainer(str(path))
    with pytest.raises(LedgerIntegrityError, match=rf"Privacy ledger '{re.escape(str(path))}' fails its integrity "
                                                   r"check(.|\n)*trigger datasets_fixed is missing(.|\n)*epsilon is "
                                                   r"1000.0, the hash chain says 50.0"):
        trainer.run()
    assert trainer.dp_steps == 0
