"""The aggregate-level accounts of the server (client-level DP-FedAvg and secure aggregation): asked before every
round (the first included: a target below one round's ε releases nothing), kept across jobs under the server's
workspace root per federation_id, and the coalition bound k_min − t of secure aggregation."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from monai_dp.fl.accounts import account_file, load_account, require_round, save_account
from monai_dp.fl.client_level import ClientLevelDP
from monai_dp.fl.secure import DistributedNoise
from monai_dp.utils.errors import PrivacyBudgetExhaustedError
from tests.fl.tiny import pld_epsilon

pytest.importorskip("nvflare", reason="federated tests need NVIDIA FLARE: pip install 'monai_dp[fl]'")

SIGMA, DELTA = 1.0, 1e-5
BELOW_ONE_ROUND = pld_epsilon(SIGMA, 1.0, 1, DELTA) / 2
TWO_NOT_THREE = (pld_epsilon(SIGMA, 1.0, 2, DELTA) + pld_epsilon(SIGMA, 1.0, 3, DELTA)) / 2  # at q = 1


def _fl_ctx(root, clients=("site-1", "site-2", "site-3"), job_name="my_job"):
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey
    from nvflare.apis.fl_context import FLContext

    engine = SimpleNamespace(get_clients=lambda: [SimpleNamespace(name=c) for c in clients],
                             get_workspace=lambda: SimpleNamespace(get_root_dir=lambda: str(root)))
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    ctx.set_prop(FLContextKey.JOB_META, {"name": job_name}, private=True, sticky=False)
    return ctx


# ---------------------------------------------------------------------- the first round is asked too
def test_a_target_below_one_round_refuses_the_first_round():
    for mechanism in (ClientLevelDP(3, 1.0, 0.1, SIGMA, BELOW_ONE_ROUND, DELTA),
                      DistributedNoise(3, 0.1, SIGMA, 2, BELOW_ONE_ROUND, DELTA)):
        assert mechanism.rounds == 0 and not mechanism.allows_round()
        with pytest.raises(PrivacyBudgetExhaustedError, match=r"`aggregate-level ε after one more round` must be at "
                           rf"most target_epsilon={re.escape(str(BELOW_ONE_ROUND))}, got 4\.\d+ \(0 rounds"):
            require_round(mechanism, "aggregate-level")


def test_the_secure_job_is_refused_when_one_round_exceeds_its_target():
    pytest.importorskip("tenseal", reason="secure aggregation needs TenSEAL: pip install 'monai_dp[he]'")
    from monai_dp.fl.secure_job import secure_fedavg_recipe

    with pytest.raises(PrivacyBudgetExhaustedError, match=r"must be at most target_epsilon=2\.\d+, got 4"):
        secure_fedavg_recipe("bundle", ["site-1", "site-2", "site-3"], 2, 0.01, SIGMA, BELOW_ONE_ROUND, 2, DELTA)


def test_the_plain_server_refuses_to_start_and_asks_before_every_round(tmp_path):
    from monai_dp.fl.server import DPFedAvg

    ctrl = DPFedAvg(num_rounds=3, client_level={"sample_rate": 1.0, "clip_norm": 0.1, "noise_multiplier": SIGMA,
                                                "target_epsilon": BELOW_ONE_ROUND, "target_delta": DELTA})
    ctrl.fl_ctx = _fl_ctx(tmp_path)
    ctrl.engine = ctrl.fl_ctx.get_engine()
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"`client-level ε after one more round`"):
        ctrl.open_client_level()
    assert ctrl.client_dp.rounds == 0  # nothing was released
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"`client-level ε after one more round`"):
        ctrl.sample_clients(None)  # the check before a round's task


def test_the_secure_server_refuses_to_start_and_asks_before_every_broadcast(tmp_path):
    pytest.importorskip("tenseal", reason="secure aggregation needs TenSEAL: pip install 'monai_dp[he]'")
    from monai_dp.fl.secure_job import SecureScatterAndGather

    ctrl = SecureScatterAndGather(federation_id="fed-a")
    ctrl.noise = DistributedNoise(3, 0.1, SIGMA, 2, BELOW_ONE_ROUND, DELTA)
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"`aggregate-level ε after one more round`"):
        ctrl.open_account(_fl_ctx(tmp_path))
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"`aggregate-level ε after one more round`"):
        ctrl.broadcast_and_wait(task=None, fl_ctx=_fl_ctx(tmp_path))


# ---------------------------------------------------------------------- the account outlives the job
def test_states_round_trip_through_the_account_file(tmp_path):
    noise = DistributedNoise(3, 0.1, SIGMA, 2, target_delta=DELTA)
    noise.record_round(3)
    noise.record_round(2)
    path = account_file(tmp_path, "fed-a")
    save_account(path, "fed-a", "secure_aggregation", noise.accounting_state())
    again = DistributedNoise(3, 0.1, SIGMA, 2, target_delta=DELTA)
    again.load_accounting_state(load_account(path, "fed-a", "secure_aggregation"))
    assert (again.rounds, again.min_summed) == (2, 2)
    assert again.get_epsilon() == noise.get_epsilon() and again.individual_epsilon() == noise.individual_epsilon()
    central = ClientLevelDP(3, 0.5, 0.1, SIGMA)
    central.record_round()
    save_account(path, "fed-a", "client_level", central.accounting_state())
    with open(path) as f:
        assert json.load(f)["state"]["accountant"]["history"] == [[SIGMA, 0.5, 1]]  # plain JSON
    with pytest.raises(ValueError, match=r"`account file` must be of federation_id='fed-b'"):
        load_account(path, "fed-b", "client_level")
    with pytest.raises(ValueError, match=r"`federation_id` must be 1 to 128 letters"):
        account_file(tmp_path, "../elsewhere")
    assert load_account(account_file(tmp_path, "fed-new"), "fed-new", "client_level") is None


def _plain_job(root, federation_id=None):
    from monai_dp.fl.server import DPFedAvg

    client_level = {"sample_rate": 1.0, "clip_norm": 0.1, "noise_multiplier": SIGMA, "target_epsilon": TWO_NOT_THREE,
                    "target_delta": DELTA, "noise_seed": 0}
    if federation_id:
        client_level["federation_id"] = federation_id
    ctrl = DPFedAvg(num_rounds=3, client_level=client_level)
    ctrl.fl_ctx = _fl_ctx(root)
    ctrl.engine = ctrl.fl_ctx.get_engine()
    ctrl.open_client_level()
    return ctrl


def _plain_round(ctrl, r):
    ctrl.current_round, ctrl._template, ctrl._clipped = r, {"w": torch.zeros(2)}, []
    ctrl._get_aggregated_result()


def test_a_resubmitted_plain_job_continues_the_client_level_account(tmp_path):
    first = _plain_job(tmp_path)
    assert first.federation_id == "my_job"  # default: the job's name
    _plain_round(first, 0)
    _plain_round(first, 1)
    assert os.path.isfile(os.path.join(tmp_path, "monai_dp_accounts", "my_job.json"))
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"\(2 rounds accounted so far\)"):
        _plain_job(tmp_path)  # the same federation again: 2 rounds spent, a third exceeds the target
    other = _plain_job(tmp_path, federation_id="other-sites")  # a new id: a new account
    assert other.client_dp.rounds == 0
    _plain_round(other, 0)
    assert other.client_dp.get_epsilon() == pytest.approx(pld_epsilon(SIGMA, 1.0, 1, DELTA), rel=0.02)


def _secure_job(root, federation_id="fed-a", target=TWO_NOT_THREE):
    from monai_dp.fl.secure_job import SecureScatterAndGather

    ctrl = SecureScatterAndGather(federation_id=federation_id, report_file=str(root / "report.json"),
                                  secure={"num_sites": 3, "clip_norm": 0.1, "noise_multiplier": SIGMA, "min_sites": 2,
                                          "target_epsilon": target, "target_delta": DELTA})
    ctrl.noise = DistributedNoise(**ctrl.secure)
    ctrl._engine = _fl_ctx(root).get_engine()
    ctrl._start_round, ctrl._num_rounds = 0, 3
    ctrl.open_account(_fl_ctx(root))
    return ctrl


def _secure_round(ctrl, r, summed):
    ctrl.aggregator = SimpleNamespace(reports={}, received={}, accepted_sites=list(summed))
    ctrl._current_round = r
    ctrl._round_done(_fl_ctx(ctrl.report_file.rsplit("/", 1)[0]))


def test_a_resubmitted_secure_job_continues_the_aggregate_account_and_its_k_min(tmp_path):
    pytest.importorskip("tenseal", reason="secure aggregation needs TenSEAL: pip install 'monai_dp[he]'")
    first = _secure_job(tmp_path, target=None)
    _secure_round(first, 0, ["site-1", "site-2", "site-3"])
    assert first.noise.report()["coalition_bound"] == 1  # all 3 summed: coalitions of at most n - t = 1
    _secure_round(first, 1, ["site-1", "site-2"])  # site-3 dropped: k_min = 2 = t
    report = json.loads((tmp_path / "report.json").read_text())["secure_aggregation"]
    assert report["min_summed"] == 2 and report["coalition_bound"] == 0
    assert "at most 0 of the 3 sites" in report["guarantee"]
    second = _secure_job(tmp_path, target=None)  # resubmitted: ε continues from the 2 rounds, k_min too
    assert second.noise.rounds == 2 and second.noise.min_summed == 2
    _secure_round(second, 0, ["site-1", "site-2", "site-3"])
    assert second.noise.get_epsilon() == pytest.approx(pld_epsilon(SIGMA, 1.0, 3, DELTA), rel=0.02)
    assert second.noise.report()["coalition_bound"] == 0
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"\(3 rounds accounted so far\)"):
        _secure_job(tmp_path)  # with a target that fits 2 rounds: refused before any round
    assert _secure_job(tmp_path, federation_id="fed-b").noise.rounds == 0


def test_the_site_ledger_note_states_k_min_and_a_test_seed():
    from monai_dp.fl.secure_client import ledger_note

    note = ledger_note(DistributedNoise(3, 0.1, SIGMA, 2, noise_seed=17))
    assert "coalitions of at most k_min - 2 sites" in note and "1 when all 3 sites were summed" in note
    assert "noise_seed=17 (TESTS ONLY" in note
    assert "noise_seed" not in ledger_note(DistributedNoise(3, 0.1, SIGMA, 2))
