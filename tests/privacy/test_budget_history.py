"""PrivacyBudget.compose_prior: the accounting behind loaded weights is put before the job's own steps."""

from __future__ import annotations

import pytest

from monai_dp.privacy.accountants import create_accountant
from monai_dp.privacy.budget import LedgerGate, PrivacyBudget, PrivacyPlan
from monai_dp.utils.errors import DPConfigurationError

DELTA = 1e-3


def _budget(unit="record", target=None, sigma=1.0, q=0.1):
    plan = PrivacyPlan.create(target_epsilon=target, noise_multiplier=sigma, delta=DELTA, sample_rate=q,
                              planned_steps=20, accountant="prv", max_grad_norm=1.0, num_units=100, unit=unit)
    return PrivacyBudget(plan)


def _earlier(steps, sigma=2.0, q=0.2, **extra):
    b = _budget(sigma=sigma, q=q)
    for _ in range(steps):
        b.record_step()
    return dict(b.state_dict(), **extra)


def test_prior_history_comes_first_and_epsilon_composes():
    b = _budget()
    b.record_step()
    b.compose_prior(_earlier(7, model_digest="abc"), "model.pt")
    assert b.accountant.history == [(2.0, 0.2, 7), (1.0, 0.1, 1)] and b.steps == 8 and b.prior_steps == 7
    ref = create_accountant("prv")
    ref.step(2.0, 0.2, 7)
    ref.step(1.0, 0.1, 1)
    assert b.get_epsilon() == pytest.approx(ref.get_epsilon(DELTA), rel=1e-12)
    assert b.prior == [{"source": "model.pt", "steps": 7, "model_digest": "abc", "dataset_id": None, "delta": DELTA}]
    restored = _budget()
    restored.load_state_dict(b.state_dict())  # a checkpoint keeps the earlier runs
    assert restored.prior == b.prior and restored.prior_steps == 7


def test_earlier_runs_of_the_history_are_kept_in_order():
    b = _budget()
    middle = _budget()
    middle.compose_prior(_earlier(3), "first.pt")
    middle.record_step()
    b.compose_prior(middle.state_dict(), "second.pt")
    assert [p["source"] for p in b.prior] == ["first.pt", "second.pt"] and b.prior_steps == 3 + 4


def test_the_target_caps_the_composed_epsilon():
    b = _budget(target=50.0)
    assert b.allows_step()
    ref = create_accountant("prv")
    ref.step(0.5, 0.5, 40)
    b.compose_prior(dict(_earlier(0), accountant={"accountant": "prv", "history": [[0.5, 0.5, 40]]}), "big.pt")
    assert ref.get_epsilon(DELTA) > 50 and not b.allows_step()


def test_a_ledger_gate_counts_this_runs_steps_only():
    class Run:
        run_id, spent_before, allowed_steps = 1, 0.0, 2

        def claim_step(self):
            pass

    class Ledger:
        path = "l.db"

        def budget(self, dataset_id):
            return 8.0, DELTA

    b = _budget()
    b.attach_ledger_run(Ledger(), Run(), "ds")
    b.compose_prior(_earlier(5), "model.pt")
    gate = next(g for g in b.gates if isinstance(g, LedgerGate))
    assert b.next_step_verdict().allowed
    b.record_step()
    b.record_step()
    assert not gate.verdict(b).allowed, "two steps reserved, two taken; the five behind the weights were charged before"


def test_another_unit_or_a_broken_history_is_refused():
    with pytest.raises(DPConfigurationError, match=r"`privacy history unit` must be 'patient' like this trainer, "
                                                   r"got 'record'\. .*Continue at privacy_unit='record'"):
        _budget(unit="patient").compose_prior(_earlier(2), "model.pt")
    with pytest.raises(ValueError, match=r"state\['history'\]\[0\]"):
        _budget().compose_prior(dict(_earlier(0), accountant={"accountant": "prv", "history": [[1.0, 1.5, 3]]}),
                                "model.pt")
    b = _budget()
    with pytest.raises(TypeError, match=r"`privacy history` must be a dict \(a budget's state_dict\), got 'list'"):
        b.compose_prior([], "x.pt")
    with pytest.raises(ValueError, match=r"`privacy history` must be a dict with an 'accountant' entry, got \['unit'\]"):
        b.compose_prior({"unit": "record"}, "x.pt")
    assert b.steps == 0 and b.prior == []
