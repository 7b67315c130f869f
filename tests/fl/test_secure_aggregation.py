"""Secure aggregation with distributed DP noise in NVIDIA FLARE's simulator: 3 sites, 2 rounds, NVFlare's HE (CKKS).

Every site clips its round update to C and adds its noise share N(0, σ²C²/t) with t = 2 of n = 3 sites; NVFlare's
HE filters encrypt it. site-3's DP-SGD budget runs out in round 0: it leaves, and round 1 sums site-1 and site-2
(= t). The sites write their noised updates and the decrypted global models to a debug folder (test only).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.fl.tiny import BATCH, BUNDLE, NETWORK, REPO, pld_epsilon, site_overrides

pytest.importorskip("nvflare", reason="federated tests need NVIDIA FLARE: pip install 'monai_dp[fl]'")
ts = pytest.importorskip("tenseal", reason="secure aggregation needs TenSEAL: pip install 'monai_dp[he]'")
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SITES = ["site-1", "site-2", "site-3"]
SIGMA, CLIP, T, DELTA, ROUNDS = 1.0, 0.01, 2, 1e-5, 2
N_TRAIN = 28  # tests/fl/tiny.py: 40 records less the validation and test splits
JOB = "dp_secure_fedavg"


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    q = BATCH / N_TRAIN
    # site-3: 3 steps (round 0) fit its budget, a 4th does not: it leaves after round 0
    target_3 = (pld_epsilon(1.0, q, 3, DELTA) + pld_epsilon(1.0, q, 4, DELTA)) / 2
    sites = {
        s: {"target_epsilon": 8.0, "dataset_id": s, "output_dir": str(tmp / s / "out"),
            "overrides": site_overrides(tmp / s / "data", seed=i + 1)} for i, s in enumerate(SITES)}
    sites["site-1"]["ledger"] = str(tmp / "site-1" / "ledger.db")
    sites["site-3"].update(target_epsilon=target_3, overrides={**sites["site-3"]["overrides"], "noise_multiplier": 1.0})
    (tmp / "sites.json").write_text(json.dumps(sites))
    cmd = [sys.executable, "-m", "monai_dp.fl.secure_job", "--bundle_root", str(BUNDLE), "--sites", *SITES,
           "--num_rounds", str(ROUNDS), "--site_config", str(tmp / "sites.json"), "--clip_norm", str(CLIP),
           "--noise_multiplier", str(SIGMA), "--min_sites", str(T), "--target_delta", str(DELTA),
           "--network_overrides", json.dumps({"network_def#network": NETWORK}), "--workspace", str(tmp / "ws"),
           "--debug_dir", str(tmp / "debug")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp / "ws" / JOB / "server" / "simulate_job" / "federation_report.json").read_text())
    return {"tmp": tmp, "report": report, "debug": tmp / "debug", "server": tmp / "ws" / JOB / "server"}


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in state.values()])


def test_the_server_side_aggregator_receives_ciphertext_only(federation):
    report, server = federation["report"], federation["server"]
    n_params = _flat(torch.load(federation["debug"] / "site-1" / "update_0.pt")).numel()
    for entry in report["rounds"]:
        assert entry["received"], entry
        for site, seen in entry["received"].items():
            assert set(seen["types"].values()) == {"CKKSVector"} and seen["plaintext"] == []
            assert seen["values"] == n_params and seen["ciphertext_bytes"] > 8 * n_params
    # the server's key cannot decrypt, and no site's noised update (float64 or float32 bytes) is in a server file
    context = ts.context_from((server / "startup" / "server_context.tenseal").read_bytes())
    assert not context.is_private()
    files = [p for p in server.rglob("*") if p.is_file()]
    assert any(p.name == "FL_global_model.pt" for p in files)
    blobs = [p.read_bytes() for p in files]
    for site in SITES:
        first = next(iter(torch.load(federation["debug"] / site / "update_0.pt").values())).reshape(-1)[:16]
        for dtype in (torch.float64, torch.float32):
            needle = first.to(dtype).numpy().tobytes()
            assert not any(needle in blob for blob in blobs), (site, dtype)


def test_the_decrypted_aggregate_is_the_mean_of_the_noised_updates_within_the_ckks_precision(federation):
    debug, report = federation["debug"], federation["report"]
    before = _flat(torch.load(debug / "site-1" / "global_0.pt"))
    after = {s: _flat(torch.load(debug / s / "global_1.pt")) for s in ("site-1", "site-2")}
    assert torch.equal(after["site-1"], after["site-2"])  # both sites decrypt the same aggregate
    updates = {s: _flat(torch.load(debug / s / "update_0.pt")) for s in SITES}
    got = after["site-1"] - before
    sum_error = report["rounds"][0]["aggregate"]["ckks"]["max_abs_error_of_sum"]  # measured before the run
    error = float((got * 3 - sum(updates.values())).abs().max())  # the server averages over the 3 sites
    assert 0 < error <= sum_error
    assert sum_error < 1e-3 * CLIP  # the precision is far below the clip norm (and the noise)
    for left_out in SITES:  # non-vacuous: the mean of any two sites is far outside the precision
        two = sum(u for s, u in updates.items() if s != left_out) / 2
        assert float((got - two).abs().max()) > 100 * sum_error


def test_a_dropped_site_leaves_and_the_others_go_on_with_the_shares_for_t(federation):
    report = federation["report"]
    assert [sorted(r["aggregated"]) for r in report["rounds"]] == [SITES, ["site-1", "site-2"]]
    assert report["rounds_run"] == ROUNDS and report["finished"] and report["left_early"] == ["site-3"]
    assert report["sites"]["site-3"]["stopped_at_round"] == 0
    for entry in report["rounds"]:
        for site, share in entry["site_noise"].items():  # every share calibrated for t = 2, not n = 3
            assert share["min_sites"] == T and share["num_sites"] == 3
            assert share["share_std"] == pytest.approx(SIGMA * CLIP / math.sqrt(T), rel=1e-12)
            assert "update_norm" not in share  # the norm before clipping is not covered by the noise: never sent
    # the noised updates the sites sent have the per-coordinate spread of a clipped update plus a t-share
    for site in SITES:
        update = _flat(torch.load(federation["debug"] / site / "update_0.pt"))
        assert float(update.std()) == pytest.approx(SIGMA * CLIP / math.sqrt(T), rel=0.1)


def test_the_aggregate_epsilon_with_all_sites_equals_the_central_noise_epsilon(federation):
    from monai_dp.fl.client_level import ClientLevelDP

    report = federation["report"]
    central = ClientLevelDP(num_sites=3, sample_rate=1.0, clip_norm=CLIP, noise_multiplier=SIGMA, target_delta=DELTA)
    individual = ClientLevelDP(3, 1.0, CLIP, SIGMA / math.sqrt(T), target_delta=DELTA)
    for r, entry in enumerate(report["rounds"], start=1):
        central.record_round()
        individual.record_round()
        agg = entry["aggregate"]
        assert agg["rounds"] == r and agg["noise_multiplier"] == SIGMA and agg["min_sites"] == T
        assert agg["epsilon"] == pytest.approx(central.get_epsilon(), rel=1e-9)
        assert agg["epsilon"] == pytest.approx(pld_epsilon(SIGMA, 1.0, r, DELTA), rel=0.02)
        assert agg["individual_update"]["epsilon"] == pytest.approx(individual.get_epsilon(), rel=1e-9)
        assert agg["individual_update"]["epsilon"] > agg["epsilon"]
    assert len(report["rounds"][0]["aggregated"]) == 3  # round 0: all sites present
    assert report["secure_aggregation"]["epsilon"] == pytest.approx(central.get_epsilon(), rel=1e-9)
    # round 1 summed t = 2 sites: the aggregate guarantee holds against coalitions of k_min - t = 0 sites
    assert [r["aggregate"]["coalition_bound"] for r in report["rounds"]] == [1, 0]
    assert report["secure_aggregation"]["min_summed"] == 2
    # the account outlives the job: in the server's workspace root, under the job's name (the default id)
    assert report["federation_id"] == JOB and report["account_file"].startswith(str(federation["server"]))
    with open(report["account_file"]) as f:
        account = json.load(f)["state"]
    assert account["central"]["accountant"]["history"] == [[SIGMA, 1.0, ROUNDS]] and account["min_summed"] == 2


def test_the_site_level_guarantee_is_unchanged_and_the_ledger_records_both(federation):
    from monai_dp.privacy.ledger import PrivacyLedger

    report = federation["report"]
    site_1 = report["sites"]["site-1"]["privacy"]
    assert site_1["epsilon"] == pytest.approx(pld_epsilon(site_1["noise_multiplier"], BATCH / N_TRAIN, site_1["steps"],
                                                          DELTA), rel=0.02)
    assert site_1["epsilon"] <= 8.0
    with PrivacyLedger(federation["tmp"] / "site-1" / "ledger.db", create=False) as ledger:
        runs = ledger.export("site-1")["datasets"][0]["runs"]  # export() verifies the ledger's hash chain
    assert len(runs) == ROUNDS  # one ledger run per round's training
    for run in runs:
        assert "secure aggregation with distributed noise" in run["note"]
        assert f"n=3, t={T}" in run["note"] and f"C={CLIP:g}" in run["note"]
