"""Federated DP on NVIDIA FLARE's simulator (a real server and real client processes): 2 sites, 3 rounds.

site-1 plans σ for ε = 8 over the 3 rounds; site-2 trains at σ = 1 with a budget that runs out during round 1:
it stops there, says so, and the server goes on with site-1 alone.
"""

from __future__ import annotations

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
    pld_epsilon,
    site_overrides,
    training_records,
)

pytest.importorskip("nvflare", reason="federated tests need NVIDIA FLARE: pip install 'monai_dp[fl]'")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROUNDS = 3
DELTA = 1e-5
SIGMA_2 = 1.0
N_TRAIN = 28  # ITEMS = 40 records less the bundle's validation (20 %) and test (10 %) splits; checked below
STEPS_PER_ROUND = N_TRAIN // BATCH


def _allowed_steps(sigma: float, q: float, target: float) -> int:
    n = 0
    while pld_epsilon(sigma, q, n + 1, DELTA) <= target:
        n += 1
    return n


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("federation")
    q = BATCH / N_TRAIN
    # site-2's budget: halfway between the ε of 4 and 5 steps at σ = 1, so 4 steps fit (3 in round 0, 1 in round 1)
    target_2 = (pld_epsilon(SIGMA_2, q, 4, DELTA) + pld_epsilon(SIGMA_2, q, 5, DELTA)) / 2
    sites = {
        "site-1": {"target_epsilon": 8.0, "dataset_id": "hospital-a", "ledger": str(tmp / "a" / "ledger.db"),
                   "output_dir": str(tmp / "a" / "out"), "overrides": site_overrides(tmp / "a" / "data", seed=1)},
        "site-2": {"target_epsilon": target_2, "dataset_id": "hospital-b", "ledger": str(tmp / "b" / "ledger.db"),
                   "output_dir": str(tmp / "b" / "out"),
                   "overrides": {**site_overrides(tmp / "b" / "data", seed=2), "noise_multiplier": SIGMA_2}},
    }
    (tmp / "sites.json").write_text(json.dumps(sites))
    cmd = [sys.executable, "-m", "monai_dp.fl.job", "--bundle_root", str(BUNDLE), "--sites", "site-1", "site-2",
           "--num_rounds", str(ROUNDS), "--site_config", str(tmp / "sites.json"),
           "--network_overrides", json.dumps({"network_def#network": NETWORK}), "--workspace", str(tmp / "ws")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp / "ws" / "dp_fedavg" / "server" / "simulate_job" / "federation_report.json").read_text())
    return {"tmp": tmp, "sites": sites, "report": report, "q": q}


def test_each_site_trains_from_its_own_records_at_the_planned_rate(federation):
    tmp = federation["tmp"]
    for site, folder, seed in (("site-1", "a", 1), ("site-2", "b", 2)):
        n = len(training_records(tmp / folder / "data", seed=seed))
        assert n == N_TRAIN
        assert federation["report"]["sites"][site]["privacy"]["sample_rate"] == pytest.approx(BATCH / n, rel=1e-12)


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
    assert eps[0] < eps[1] < eps[2] <= 8.0
    assert eps[2] > 7.0  # σ was planned for the 3 rounds: the budget is (nearly) used, not a third of it
    assert report["sites"]["site-1"]["privacy"]["ledger"] == federation["sites"]["site-1"]["ledger"]


def test_a_site_whose_budget_is_spent_stops_at_the_right_round_and_the_others_go_on(federation):
    report, q = federation["report"], federation["q"]
    target = federation["sites"]["site-2"]["target_epsilon"]
    allowed = _allowed_steps(SIGMA_2, q, target)
    stop_round = (allowed - 1) // STEPS_PER_ROUND
    assert (allowed, stop_round) == (4, 1)
    site_2 = report["sites"]["site-2"]
    assert site_2["stopped_at_round"] == stop_round and report["stopped"]["site-2"] == stop_round
    assert site_2["privacy"]["history"] == [[SIGMA_2, q, allowed]]
    assert site_2["privacy"]["epsilon"] == pytest.approx(pld_epsilon(SIGMA_2, q, allowed, DELTA), rel=0.02)
    assert site_2["privacy"]["epsilon"] <= target and site_2["privacy"]["budget_exhausted"]
    aggregated = [sorted(r["aggregated"]) for r in report["rounds"]]
    assert aggregated == [["site-1", "site-2"], ["site-1", "site-2"], ["site-1"]]
    assert report["rounds_run"] == ROUNDS and report["finished"] and report["left_early"] == ["site-2"]
    assert "site-2" not in report["rounds"][2]["sites"]


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
    expected = {"site-1": [0, 1, 2], "site-2": [0, 1]}  # site-2 leaves after round 1
    assert sorted(p.name for p in tb.iterdir()) == sorted(expected)
    for site, rounds in expected.items():
        eps = _tensorboard_scalars(tb / site, EPSILON_TAG)
        assert sorted(eps) == rounds
        for r in rounds:
            priv = report["rounds"][r]["sites"][site]
            assert eps[r] == pytest.approx(priv["epsilon"], rel=1e-6)  # float32 in the event file
        assert _tensorboard_scalars(tb / site, DELTA_TAG) == {r: pytest.approx(DELTA, rel=1e-6) for r in rounds}
        assert _tensorboard_scalars(tb / site, STEPS_TAG)[rounds[-1]] == report["sites"][site]["privacy"]["steps"]
