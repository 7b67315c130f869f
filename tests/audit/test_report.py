"""The audit report: patients as the worst of their records, the bound of the run's mechanism, what is written."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from monai_dp.audit.bounds import tradeoff_curve
from monai_dp.audit.report import analyse, write_report
from monai_dp.privacy.pld import Mechanism

MODELS, RECORDS = 16, 12


def _scores(seed=0, leaky=(3, 7)):
    """Members score higher than non-members by 0.1 except the ``leaky`` records (by 5): those are exposed."""
    rng = np.random.default_rng(seed)
    member = np.zeros((MODELS, RECORDS), dtype=bool)
    for r in range(RECORDS):
        member[rng.permutation(MODELS)[: MODELS // 2], r] = True
    shift = np.full(RECORDS, 0.1)
    shift[list(leaky)] = 5.0
    return rng.normal(size=(MODELS, RECORDS)) + member * shift, member


PATIENTS = ["a", "a", "b", "b", "b", "c", "d", "d", "e", "f", "f", "g"]


def test_a_patient_is_as_exposed_as_its_most_exposed_record():
    scores, member = _scores()
    res = analyse(scores, member, PATIENTS, mechanisms=None)
    rec, pat = res["record"]["auc"], res["patient"]
    for pid, auc in zip(pat["patient_id"], pat["auc"]):
        mine = [rec[i] for i, p in enumerate(PATIENTS) if p == pid]
        assert auc == max(mine)
    assert dict(zip(pat["patient_id"], pat["num_records"])) == {"a": 2, "b": 3, "c": 1, "d": 2, "e": 1, "f": 2, "g": 1}
    assert rec[3] > 0.99 and rec[7] > 0.99 and np.median(rec) < 0.8  # the leaky records stand out
    assert res["bound"] is None and "record_flag" not in res


def test_the_bound_is_the_mechanisms_and_only_exposed_records_exceed_it():
    scores, member = _scores()
    mechanisms = [Mechanism(2.0, 0.5, 4, 1)]  # a strong guarantee: bound well below the leaky records' AUC
    res = analyse(scores, member, PATIENTS, mechanisms=mechanisms)
    assert res["bound"]["auc"] == pytest.approx(tradeoff_curve(mechanisms).auc_bound())
    assert res["bound"]["auc"] < 0.9
    assert set(np.flatnonzero(res["record_significant"])) == {3, 7}
    flagged = {p for p, s in zip(res["patient"]["patient_id"], res["patient_significant"]) if s}
    assert flagged == {PATIENTS[3], PATIENTS[7]}


def test_write_report_writes_what_analyse_found(tmp_path):
    pytest.importorskip("matplotlib")
    scores, member = _scores()
    res = analyse(scores, member, PATIENTS, mechanisms=[Mechanism(2.0, 0.5, 4, 1)])
    md = write_report(res, tmp_path, record_ids=[f"r{i}" for i in range(RECORDS)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_patients"] == 7 and summary["patients_significantly_above_bound"] == 2
    assert summary["patient_auc"]["max"] == pytest.approx(float(res["patient"]["auc"].max()))
    with open(tmp_path / "records.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["record"] for r in rows] == [f"r{i}" for i in range(RECORDS)]
    assert [int(r["significantly_above_bound"]) for r in rows] == res["record_significant"].astype(int).tolist()
    assert md.read_text().startswith("#") and (tmp_path / "report.html").read_text().startswith("<!doctype html>")
