"""Client-level DP-FedAvg at the server, in NVIDIA FLARE's simulator: sites Poisson-sampled (q = 0.5), every round
accounted (also one where no site is sampled: the noise is still added), the federation stops before a round would
exceed the client-level budget (the sites train with site-level DP-SGD as well)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fl.tiny import BUNDLE, NETWORK, REPO, pld_epsilon, site_overrides

pytest.importorskip("nvflare", reason="federated tests need NVIDIA FLARE: pip install 'monai_dp[fl]'")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SIGMA, CLIP, DELTA, Q = 2.0, 0.05, 1e-5, 0.5
SEED = 4  # the server's generator with this seed samples neither site in round 0 (both first draws >= 0.5)


def test_client_level_rounds_are_accounted_and_stop_at_the_budget(tmp_path):
    import torch

    assert min(torch.rand(2, generator=torch.Generator().manual_seed(SEED)).tolist()) >= Q
    target = (pld_epsilon(SIGMA, Q, 2, DELTA) + pld_epsilon(SIGMA, Q, 3, DELTA)) / 2  # 2 rounds fit, not 3
    sites = {s: {"target_epsilon": 50.0, "dataset_id": s, "output_dir": str(tmp_path / s / "out"),
                 "overrides": site_overrides(tmp_path / s / "data", seed=i)} for i, s in enumerate(("site-1", "site-2"))}
    (tmp_path / "sites.json").write_text(json.dumps(sites))
    client_level = {"sample_rate": Q, "clip_norm": CLIP, "noise_multiplier": SIGMA, "target_epsilon": target,
                    "target_delta": DELTA, "noise_seed": SEED}
    cmd = [sys.executable, "-m", "monai_dp.fl.job", "--bundle_root", str(BUNDLE), "--sites", "site-1", "site-2",
           "--num_rounds", "3", "--site_config", str(tmp_path / "sites.json"), "--client_level", json.dumps(client_level),
           "--network_overrides", json.dumps({"network_def#network": NETWORK}), "--workspace", str(tmp_path / "ws")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "ws" / "dp_fedavg" / "server" / "simulate_job" / "federation_report.json").read_text())
    assert report["rounds_run"] == 2 and report["client_level"]["stopped_after_round"] == 1
    assert report["rounds"][0]["aggregated"] == [] and "update_norms" not in report["rounds"][0]
    for r, entry in enumerate(report["rounds"], start=1):
        assert set(entry["aggregated"]) <= {"site-1", "site-2"}
        assert set(entry.get("update_norms", {})) == set(entry["aggregated"])
        assert all(n > 0 for n in entry.get("update_norms", {}).values())
        assert entry["client_level"]["rounds"] == r
        assert entry["client_level"]["epsilon"] == pytest.approx(pld_epsilon(SIGMA, Q, r, DELTA), rel=0.02)
    assert report["client_level"]["epsilon"] <= target and report["client_level"]["noise_seeded"]
    assert report["stopped"] == {}  # no site spent its own (site-level) budget
    # the client-level account outlives the job: under the server's workspace root, by the job's name
    assert report["client_level"]["federation_id"] == "dp_fedavg"
    with open(report["client_level"]["account_file"]) as f:
        account = json.load(f)["state"]
    assert sum(e[2] for e in account["accountant"]["history"]) == 2
