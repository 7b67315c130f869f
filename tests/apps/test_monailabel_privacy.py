"""The MONAI Label app's privacy settings and budget status (apps/monailabel_dp/lib/privacy.py), without a server.

The module imports only monai_dp, so these run without monailabel installed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.privacy.pld import compose_epsilon
from monai_dp.utils.errors import PrivacyBudgetExhaustedError

_PATH = Path(__file__).resolve().parents[2] / "apps" / "monailabel_dp" / "lib" / "privacy.py"
_spec = importlib.util.spec_from_file_location("monailabel_dp_privacy", _PATH)
privacy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(privacy)

SIGMA, Q, DELTA = 1.5, 0.5, 1e-5


def _settings(tmp_path, **conf):
    return privacy.privacy_settings(conf, str(tmp_path / "model"), default_epsilon=8.0)


def _charge(settings, model: str, steps: int) -> None:
    with PrivacyLedger(settings.ledger) as ledger:
        run = ledger.begin_run(settings.dataset_id, SIGMA, Q, 1.0, steps,
                               note=privacy.run_note(model, "sha256:0123456789abcdef", 4))
        for _ in range(steps):
            run.claim_step()
        run.finish()


def test_settings_defaults_and_conf(tmp_path):
    s = _settings(tmp_path)
    assert s == privacy.PrivacySettings(str((tmp_path / "model" / "privacy_ledger.db").resolve()),
                                        "monailabel-studies", 8.0, 1e-5, "record")
    s = _settings(tmp_path, target_epsilon="3", target_delta="1e-6", dataset_id="site-a", ledger=str(tmp_path / "l.db"))
    assert (s.target_epsilon, s.target_delta, s.dataset_id, s.ledger) == (3.0, 1e-6, "site-a", str(tmp_path / "l.db"))


@pytest.mark.parametrize("key,value,match", [
    ("target_epsilon", "abc", r"`target_epsilon` must be a positive finite number, got 'abc'"),
    ("target_epsilon", "nan", r"`target_epsilon` must be a positive finite number, got 'nan'"),
    ("target_epsilon", "-1", r"`target_epsilon` must be a positive finite number, got '-1'"),
    ("target_delta", "1.5", r"`target_delta` must be in \(0, 1\), got 1.5"),
    ("privacy_unit", "study", r"`privacy_unit` must be 'record' or 'patient', got 'study'"),
])
def test_settings_refuse_bad_values(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        _settings(tmp_path, **{key: value})


def test_budget_registered_once_and_fixed(tmp_path):
    s = _settings(tmp_path, target_epsilon="4")
    privacy.register_budget(s)
    privacy.register_budget(s)  # the next start: same budget, nothing changes
    with pytest.raises(ValueError, match="A recorded budget cannot be changed"):
        privacy.register_budget(_settings(tmp_path, target_epsilon="5"))


def test_status_composes_all_runs_and_lists_the_model_runs(tmp_path):
    s = _settings(tmp_path, target_epsilon="4")
    privacy.register_budget(s)
    fresh = privacy.model_status(s, "seg", str(tmp_path / "privacy_report.json"))
    assert (fresh["epsilon_spent"], fresh["epsilon_left"], fresh["runs"], fresh["exhausted"]) == (0.0, 4.0, [], False)
    assert fresh["last_training"] is None  # never trained
    (tmp_path / "privacy_report.json").write_text('{"epsilon": 2.5, "steps": 7, "delta": 1e-05, "history": {}}')
    assert privacy.model_status(s, "seg", str(tmp_path / "privacy_report.json"))["last_training"] == {
        "epsilon": 2.5, "delta": 1e-05, "steps": 7, "noise_multiplier": None, "sample_rate": None,
        "accountant": None, "unit": None, "date": None}
    assert (fresh["delta"], fresh["privacy_unit"], fresh["dataset_id"]) == (DELTA, "record", "monailabel-studies")
    _charge(s, "seg", 2)
    _charge(s, "cls", 1)  # another model trained on the same annotations spends the same budget
    status = privacy.model_status(s, "seg")
    spent = compose_epsilon([(SIGMA, Q, 3)], DELTA)
    assert status["epsilon_spent"] == pytest.approx(spent, rel=1e-9)
    assert status["epsilon_left"] == pytest.approx(4.0 - spent, rel=1e-9)
    assert [r["steps_taken"] for r in status["runs"]] == [2, 1]
    assert [r["steps_taken"] for r in status["model_runs"]] == [2]
    assert [r["status"] for r in status["runs"]] == ["finished", "finished"]


def test_spent_budget_is_refused_with_a_clear_message(tmp_path):
    exact = compose_epsilon([(SIGMA, Q, 2)], DELTA)
    s = _settings(tmp_path, target_epsilon=repr(exact))
    privacy.register_budget(s)
    assert privacy.check_budget_left(s)["runs"] == []
    _charge(s, "seg", 2)
    assert math.isclose(privacy.model_status(s, "seg")["epsilon_left"], 0.0, abs_tol=1e-12)
    assert privacy.model_status(s, "seg")["exhausted"]
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"Privacy budget exhausted: the annotations of dataset "
                       r"'monailabel-studies' have spent ε = .* over 1 runs; training is refused"):
        privacy.check_budget_left(s)


def test_a_step_that_does_not_fit_what_is_left_is_refused(tmp_path):
    four, five = (compose_epsilon([(SIGMA, Q, k)], DELTA) for k in (4, 5))
    s = _settings(tmp_path, target_epsilon=repr((four + five) / 2))
    privacy.register_budget(s)
    privacy.check_step_fits(s, SIGMA, Q)
    _charge(s, "seg", 4)
    privacy.check_budget_left(s)  # something is left ...
    with pytest.raises(PrivacyBudgetExhaustedError, match="Not a single step of the requested run"):
        privacy.check_step_fits(s, SIGMA, Q)  # ... but not one more step of this mechanism
    privacy.check_step_fits(s, 50.0, Q)  # a much noisier run still fits


def test_budget_refusal_is_found_behind_the_bundle_errors():
    refusal = PrivacyBudgetExhaustedError("spent")
    try:
        try:
            raise refusal
        except PrivacyBudgetExhaustedError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner
    except RuntimeError as caused:
        assert privacy.budget_refusal(caused) is refusal
    try:
        try:
            raise refusal
        except PrivacyBudgetExhaustedError:
            raise ValueError("while handling it")
    except ValueError as context:
        assert privacy.budget_refusal(context) is refusal
    assert privacy.budget_refusal(RuntimeError("unrelated")) is None


def test_patient_level_overrides_carry_the_unit_and_pattern(tmp_path):
    s = _settings(tmp_path, privacy_unit="patient", patient_id_pattern=r"(?P<patient>pat[0-9]+)_")
    assert privacy.bundle_privacy_overrides(s) == {
        "target_delta": 1e-5, "privacy_unit": "patient", "dataset_id": "monailabel-studies", "ledger": None,
        "patient_id_pattern": r"(?P<patient>pat[0-9]+)_"}
    records = [{"image": f"/studies/pat{p}_{k}.nii.gz", "label": f"/studies/labels/final/pat{p}_{k}.nii.gz"}
               for p, k in [(1, "a"), (1, "b"), (22, "a")]]
    assert privacy.patient_ids(s, records) == ["pat1", "pat1", "pat22"]
    plain = privacy.bundle_privacy_overrides(_settings(tmp_path))
    assert (plain["privacy_unit"], plain["patient_id_pattern"]) == ("record", None)


def test_pattern_without_patient_level_or_invalid_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`patient_id_pattern` must be a valid regular expression, got '\(pat'"):
        _settings(tmp_path, privacy_unit="patient", patient_id_pattern="(pat")
    with pytest.raises(ValueError, match=r"`patient_id_pattern` must be unset at record level, got '\(p\)'.*"
                                         r"--conf privacy_unit patient"):
        _settings(tmp_path, patient_id_pattern="(p)")


def test_patient_level_without_a_way_to_derive_ids_is_refused(tmp_path):
    records = [{"image": str(tmp_path / "img0.nii.gz"), "label": str(tmp_path / "lab0.nii.gz")}]
    s = _settings(tmp_path, privacy_unit="patient")
    with pytest.raises(ValueError) as info:
        privacy.patient_ids(s, records)
    msg = str(info.value)
    assert msg.startswith("Patient-level training refused, nothing was trained: ")
    assert "pass `patient_id_pattern`" in msg and "DICOM" in msg  # the trainer's own how-to
    assert "--conf privacy_unit patient --conf patient_id_pattern REGEX" in msg  # and how in this app
    s = _settings(tmp_path, privacy_unit="patient", patient_id_pattern=r"pat([0-9]+)")
    with pytest.raises(ValueError, match=r"a path matching patient_id_pattern 'pat\(\[0-9\]\+\)'.*--conf privacy_unit"):
        privacy.patient_ids(s, records)


def test_a_record_level_ledger_refuses_a_patient_level_start(tmp_path):
    privacy.register_budget(_settings(tmp_path))
    with pytest.raises(ValueError, match=r"must be the budget recorded for dataset 'monailabel-studies', "
                                         r"\(8, 1e-05, 'record'\), got \(8.0, 1e-05, 'patient'\)"):
        privacy.register_budget(_settings(tmp_path, privacy_unit="patient", patient_id_pattern="(p[0-9]+)"))
