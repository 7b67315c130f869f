"""Federated DP on NVIDIA FLARE's simulator (a real server and real client processes): 3 sites, 3 rounds, then the
job submitted again for two of the sites (a new simulator run: new server and client processes) on the same site
folders and ledgers.

site-1 plans σ for ε = 8 over the 3 rounds; site-2 trains at patient level at σ = 1 with a budget that runs out
during round 1: it stops there, says so, and the server goes on without it; site-3 trains at σ = 1 with a budget
for 4 rounds. The job resubmitted for site-2 and site-3 continues their accounting: site-3 trains one more round
and its budget is spent, site-2 (spent in the first job) takes no step and its ε stays as it was.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from tests.fl.tiny import (
    BATCH,
    BUNDLE,
    NETWORK,
    REPO,
    site_overrides,
    training_records,
)
from tests.fl.tiny import pld_epsilon as _pld_epsilon

pytest.importorskip("nvflare", reason="federated tests need NVIDIA FLARE: pip install 'monai_dp[fl]'")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROUNDS = 3
DELTA = 1e-5
SIGMA = 1.0  # site-2's and site-3's noise multiplier (given, not planned)
N_TRAIN = 28  # ITEMS = 40 records less the bundle's validation (20 %) and test (10 %) splits; checked below
N_PATIENTS = 14  # two records per synthetic patient; site-2's training patients, checked below
BATCH_2 = 4  # site-2's batch (of patients): q = 4 / 14, 3 steps per round like the record-level sites
STEPS_PER_ROUND = int(N_TRAIN / BATCH)  # the Poisson loader's steps per epoch: int(1 / q)
SITES = ("site-1", "site-2", "site-3")
FOLDERS = {"site-1": ("a", 1), "site-2": ("b", 2), "site-3": ("c", 3)}  # data folder, seed
RESUBMITTED = ("site-2", "site-3")  # the sites of the second job (site-1 is done; one process less to start)
pld_epsilon = functools.lru_cache(_pld_epsilon)  # the same (σ, q, steps) is asked several times


def _allowed_steps(sigma: float, q: float, target: float) -> int:
    n = 0
    while pld_epsilon(sigma, q, n + 1, DELTA) <= target:
        n += 1
    return n


def _between(sigma: float, q: float, steps: int) -> float:
    """A budget halfway between the ε of ``steps`` and ``steps + 1`` steps: exactly ``steps`` fit."""
    return (pld_epsilon(sigma, q, steps, DELTA) + pld_epsilon(sigma, q, steps + 1, DELTA)) / 2


def _simulate(tmp, workspace, sites=SITES):
    cmd = [sys.executable, "-m", "monai_dp.fl.job", "--bundle_root", str(BUNDLE), "--sites", *sites,
           "--num_rounds", str(ROUNDS), "--site_config", str(tmp / "sites.json"),
           "--network_overrides", json.dumps({"network_def#network": NETWORK}), "--workspace", str(workspace)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((workspace / "dp_fedavg" / "server" / "simulate_job" / "federation_report.json").read_text())


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("federation")
    q, q_2 = BATCH / N_TRAIN, BATCH_2 / N_PATIENTS

    def site(key, target, **overrides):
        folder, seed = FOLDERS[key]
        return {"target_epsilon": target, "dataset_id": f"hospital-{folder}", "ledger": str(tmp / folder / "ledger.db"),
                "output_dir": str(tmp / folder / "out"),
                "overrides": {**site_overrides(tmp / folder / "data", seed=seed), **overrides}}

    sites = {
        "site-1": site("site-1", 8.0),
        # 4 patient-level steps fit: 3 in round 0, 1 in round 1
        "site-2": site("site-2", _between(SIGMA, q_2, 4), noise_multiplier=SIGMA, privacy_unit="patient",
                       batch_size=BATCH_2),
        # 12 steps fit: the 3 rounds of the first job and 1 round of the second
        "site-3": site("site-3", _between(SIGMA, q, 4 * STEPS_PER_ROUND), noise_multiplier=SIGMA),
    }
    (tmp / "sites.json").write_text(json.dumps(sites))
    report = _simulate(tmp, tmp / "ws")
    return {"tmp": tmp, "sites": sites, "report": report, "q": q, "q_2": q_2}


@pytest.fixture(scope="module")
def resubmitted(federation):
    """The job submitted again after the first (a new simulator run: new server and client processes) for site-2 and
    site-3 with the same site configuration: the same output folders (saved accounting) and ledgers."""
    return _simulate(federation["tmp"], federation["tmp"] / "ws_resubmitted", RESUBMITTED)


def test_each_site_trains_from_its_own_records_at_the_planned_rate(federation):
    tmp, report = federation["tmp"], federation["report"]
    for site in ("site-1", "site-3"):
        folder, seed = FOLDERS[site]
        n = len(training_records(tmp / folder / "data", seed=seed))
        assert n == N_TRAIN
        assert report["sites"][site]["privacy"]["sample_rate"] == pytest.approx(BATCH / n, rel=1e-12)
        assert report["sites"][site]["privacy"]["unit"] == "record"


def test_a_patient_level_site_samples_patients(federation):
    """site-2's q is its batch over its distinct patients (read from its data), not over its records."""
    tmp, report = federation["tmp"], federation["report"]
    records = training_records(tmp / "b" / "data", seed=2)
    patients = {r["patient_id"] for r in records}
    assert len(patients) == N_PATIENTS < len(records)  # patients with more than one record
    privacy = report["sites"]["site-2"]["privacy"]
    assert privacy["unit"] == "patient"
    assert privacy["sample_rate"] == pytest.approx(BATCH_2 / len(patients), rel=1e-12)
    assert privacy["sample_rate"] != pytest.approx(BATCH_2 / len(records), rel=1e-3)


def test_site_epsilon_after_every_round_is_the_pld_of_its_history(federation):
    report, q = federation["report"], federation["q"]
    sigma = report["sites"]["site-1"]["privacy"]["noise_multiplier"]
    eps = []
    for r in range(ROUNDS):  # ε continues across rounds (one trainer, one budget), it is never reset
        site_1 = report["rounds"][r]["sites"]["site-1"]
        steps = (r + 1) * STEPS_PER_ROUND
        assert site_1["history"] == [[sigma, q, steps]] and site_1["rounds_done"] == r + 1
        assert site_1["epsilon"] == pytest.approx(pld_epsilon(sigma, q, steps, DELTA), rel=0.02)
        eps.append(site_1["epsilon"])
        site_3 = report["rounds"][r]["sites"]["site-3"]
        assert site_3["history"] == [[SIGMA, q, steps]] and not site_3["budget_exhausted"]
    assert eps[0] < eps[1] < eps[2] <= 8.0
    assert eps[2] > 7.0  # σ was planned for the 3 rounds: the budget is (nearly) used, not a third of it
    assert report["sites"]["site-1"]["privacy"]["ledger"] == federation["sites"]["site-1"]["ledger"]


def test_a_site_whose_budget_is_spent_stops_at_the_right_round_and_the_others_go_on(federation):
    report, q_2 = federation["report"], federation["q_2"]
    target = federation["sites"]["site-2"]["target_epsilon"]
    allowed = _allowed_steps(SIGMA, q_2, target)
    steps_per_round_2 = int(1 / q_2)
    stop_round = (allowed - 1) // steps_per_round_2
    assert (allowed, steps_per_round_2, stop_round) == (4, 3, 1)  # it stops within round 1
    site_2 = report["sites"]["site-2"]
    assert site_2["stopped_at_round"] == stop_round and report["stopped"]["site-2"] == stop_round
    assert site_2["privacy"]["history"] == [[SIGMA, pytest.approx(q_2, rel=1e-12), allowed]]
    assert site_2["privacy"]["epsilon"] == pytest.approx(pld_epsilon(SIGMA, q_2, allowed, DELTA), rel=0.02)
    assert site_2["privacy"]["epsilon"] <= target and site_2["privacy"]["budget_exhausted"]
    aggregated = [sorted(r["aggregated"]) for r in report["rounds"]]
    assert aggregated == [list(SITES), list(SITES), ["site-1", "site-3"]]
    assert report["rounds_run"] == ROUNDS and report["finished"] and report["left_early"] == ["site-2"]
    assert "site-2" not in report["rounds"][2]["sites"]


def test_a_resubmitted_job_continues_every_sites_accounting(federation, resubmitted):
    """New server and client processes on the same site folders and ledgers: no site starts again from ε = 0."""
    first, q = federation["report"], federation["q"]
    site_3 = resubmitted["sites"]["site-3"]["privacy"]
    steps = (ROUNDS + 1) * STEPS_PER_ROUND  # the first job's 3 rounds and this job's first round
    assert site_3["history"] == [[SIGMA, q, steps]] and site_3["rounds_done"] == ROUNDS + 1
    assert site_3["noise_multiplier"] == first["sites"]["site-3"]["privacy"]["noise_multiplier"]
    assert site_3["epsilon"] == pytest.approx(pld_epsilon(SIGMA, q, steps, DELTA), rel=0.02)
    assert site_3["epsilon"] > first["sites"]["site-3"]["privacy"]["epsilon"]
    # its budget allowed exactly those steps: spent after this round, like site-2's, so the job ends
    assert site_3["budget_exhausted"] and site_3["epsilon"] <= federation["sites"]["site-3"]["target_epsilon"]
    assert [sorted(r["aggregated"]) for r in resubmitted["rounds"]] == [["site-3"]]
    assert resubmitted["rounds_run"] == 1 and resubmitted["stopped"] == {s: 0 for s in RESUBMITTED}


def test_a_site_whose_budget_was_spent_does_not_train_in_a_resubmitted_job(federation, resubmitted):
    before = federation["report"]["sites"]["site-2"]["privacy"]  # spent in round 1 of the first job
    after = resubmitted["rounds"][0]["sites"]["site-2"]
    assert before["budget_exhausted"] and after["budget_exhausted"] and after["unit"] == "patient"
    assert after["history"] == before["history"] and after["steps"] == before["steps"]
    assert after["epsilon"] == before["epsilon"] and after["noise_multiplier"] == before["noise_multiplier"]
    assert "site-2" not in resubmitted["rounds"][0]["aggregated"]


def _tensorboard_scalars(folder, tag):
    """``{step: value}`` of ``tag`` in the TensorBoard event files under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_the_server_writes_every_sites_epsilon_per_round_to_tensorboard(federation):
    pytest.importorskip("tensorboard")
    from monai_dp.fl.client import DELTA_TAG, EPSILON_TAG, STEPS_TAG
    from monai_dp.fl.job import TB_FOLDER

    report = federation["report"]
    tb = federation["tmp"] / "ws" / "dp_fedavg" / "server" / "simulate_job" / TB_FOLDER
    expected = {"site-1": [0, 1, 2], "site-2": [0, 1], "site-3": [0, 1, 2]}  # site-2 leaves after round 1
    assert sorted(p.name for p in tb.iterdir()) == sorted(expected)
    for site, rounds in expected.items():
        eps = _tensorboard_scalars(tb / site, EPSILON_TAG)
        assert sorted(eps) == rounds
        for r in rounds:
            priv = report["rounds"][r]["sites"][site]
            assert eps[r] == pytest.approx(priv["epsilon"], rel=1e-6)  # float32 in the event file
        assert _tensorboard_scalars(tb / site, DELTA_TAG) == {r: pytest.approx(DELTA, rel=1e-6) for r in rounds}
        assert _tensorboard_scalars(tb / site, STEPS_TAG)[rounds[-1]] == report["sites"][site]["privacy"]["steps"]
