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


def test_report_html_renders_tables_headings_and_images_and_escapes_the_content(tmp_path):
    from monai_dp.audit.markdown_html import markdown_to_html

    md = ("# Title <b>\n\nA **bold** and `code` line\ncontinued.\n\n| name | value |\n|---|---|\n"
          "| <script>x</script> | a & b |\n| P1 | 0.5 |\n\n![plot.png](plot.png)\n")
    page = markdown_to_html(md, title="t")
    assert "<h1>Title &lt;b&gt;</h1>" in page
    assert "<p>A <strong>bold</strong> and <code>code</code> line continued.</p>" in page
    assert ("<table><thead><tr><th>name</th><th>value</th></tr></thead><tbody><tr><td>&lt;script&gt;x&lt;/script&gt;"
            "</td><td>a &amp; b</td></tr><tr><td>P1</td><td>0.5</td></tr></tbody></table>") in page
    assert '<img src="plot.png" alt="plot.png">' in page
    assert "<pre>" not in page and "|---|" not in page and "<script>" not in page


def _verdict_rows(md: str) -> list[str]:
    lines = md.splitlines()
    start = lines.index("## Verdict")
    return lines[start + 2 : start + 6]


@pytest.fixture(scope="module")
def patient_level_result():
    scores, member = _scores()
    return analyse(scores, member, PATIENTS, mechanisms=[Mechanism(2.0, 0.5, 4, 1)], unit="patient")


def test_the_verdicts_stand_side_by_side_most_exposed_patient_and_patients_above_the_bound(patient_level_result):
    from monai_dp.audit.markdown_html import markdown_to_html
    from monai_dp.audit.report import _markdown

    res = patient_level_result
    md = _markdown(res, [])
    header, rule, measured, against = _verdict_rows(md)
    assert header == "| | most exposed patient | patients above the bound |" and rule == "|---|---|---|"
    worst = int(np.argmax(res["patient"]["auc"]))
    assert measured.startswith(f"| measured | {res['patient']['patient_id'][worst]} (")
    n_sig, n_flag = int(res["patient_significant"].sum()), int(res["patient_flag"].sum())
    assert n_sig == 2
    assert f"**2 significantly** (Holm, family-wise α = 0.05); {n_flag} by more than 1 SE |" in measured
    assert against.startswith(f"| against the bound of the guarantee (AUC {res['bound']['auc']:.3f}) | above the bound")
    assert against.endswith("| the guarantee did not hold for them, or the audit is wrong |")
    assert "<th>most exposed patient</th><th>patients above the bound</th>" in markdown_to_html(md)


def test_a_patient_just_above_the_bound_within_one_se_reads_as_within_the_noise(patient_level_result):
    import copy

    from monai_dp.audit.report import _markdown

    res = copy.deepcopy(patient_level_result)
    worst = int(np.argmax(res["patient"]["auc"]))
    auc, se = res["patient"]["auc"][worst], res["patient"]["auc_se"][worst]
    res["bound"]["auc"] = float(auc - se / 2)  # just below the most exposed patient, by half a standard error
    res["patient_flag"][:] = False
    res["patient_significant"][:] = False
    _, _, measured, against = _verdict_rows(_markdown(res, []))
    assert "0 significantly (Holm, family-wise α = 0.05); 0 by more than 1 SE |" in measured
    assert f"above the bound {auc - se / 2:.3f} by {se / 2:.3f}, less than 1 SE: within the audit's noise" in against
    assert against.endswith("| consistent with the guarantee |")


def test_roc_points_with_tpr_zero_are_marked_at_the_floor():
    from monai_dp.audit.report import ROC_FLOOR, roc_on_log_axes

    x, y, at_floor = roc_on_log_axes([0.0, 0.001, 0.01, 0.5, 1.0], [0.0, 0.0, 0.0, 0.4, 1.0])
    assert x.tolist() == [ROC_FLOOR, 0.001, 0.01, 0.5, 1.0] and y.tolist() == [ROC_FLOOR, ROC_FLOOR, ROC_FLOOR, 0.4, 1.0]
    assert at_floor.tolist() == [False, True, True, False, False]  # (0, 0) is the curve's start, not a measurement
