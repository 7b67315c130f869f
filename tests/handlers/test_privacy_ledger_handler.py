"""PrivacyLedgerHandler: charges a run to the ledger, records its id and status, refuses a missing ledger."""

from __future__ import annotations

import pytest

from monai_dp.handlers import PrivacyLedgerHandler
from monai_dp.handlers.privacy_ledger_handler import open_ledger
from monai_dp.privacy.ledger import PrivacyLedger
from tests.engines.test_trainer import make_trainer

DELTA = 1e-3
DATASET = "ledger-handler-data"


def _ledger(tmp_path, epsilon=50.0):
    path = str(tmp_path / "ledger.db")
    PrivacyLedger(path).init_dataset(DATASET, epsilon=epsilon, delta=DELTA)
    return path


def test_run_is_charged_and_closed(tmp_path):
    path = _ledger(tmp_path)
    handler = PrivacyLedgerHandler(path, dataset_id=DATASET, note="first")
    trainer = make_trainer(target_delta=DELTA, handlers=[handler])
    trainer.run()
    spent = PrivacyLedger(path).spent(DATASET)
    assert [(r["status"], r["steps_taken"]) for r in spent.runs] == [("finished", trainer.dp_steps)]
    assert handler.run_id is not None and handler.run_id == spent.runs[0]["run_id"]
    assert spent.epsilon == pytest.approx(trainer.get_epsilon(), abs=0.05)  # PLD ledger vs the trainer's accountant
    assert trainer.privacy.ledger_info["head"] == PrivacyLedger(path).head()


def test_a_run_stopped_by_the_ledger_is_closed_as_stopped(tmp_path):
    path = _ledger(tmp_path, epsilon=2.0)
    trainer = make_trainer(max_epochs=20, target_delta=DELTA,
                           handlers=[PrivacyLedgerHandler(path, dataset_id=DATASET)])
    trainer.run()
    runs = PrivacyLedger(path).spent(DATASET).runs
    assert 0 < trainer.dp_steps < 200
    assert trainer.state.dp_budget_exhausted
    assert [(r["status"], r["steps_taken"]) for r in runs] == [("stopped", trainer.dp_steps)]


def test_a_missing_ledger_is_not_created(tmp_path):
    trainer = make_trainer(target_delta=DELTA, handlers=[PrivacyLedgerHandler(str(tmp_path / "none.db"),
                                                                               dataset_id=DATASET)])
    with pytest.raises(FileNotFoundError, match=r"`path` must be an existing ledger file.*monai-dp ledger init"):
        trainer.run()
    assert not (tmp_path / "none.db").exists()
    assert trainer.dp_steps == 0


def test_open_ledger_refuses_other_types():
    with pytest.raises(TypeError, match=r"`ledger` must be a path to the ledger's SQLite file or a PrivacyLedger, "
                                        r"got 'int'"):
        open_ledger(3)
