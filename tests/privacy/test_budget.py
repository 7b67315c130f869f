"""PrivacyBudget: one verdict before every step, from every gate; a plan calibrated once (pure: no torch, no ignite)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from monai_dp.privacy import create_accountant
from monai_dp.privacy.budget import EpsilonGate, LedgerGate, PrivacyBudget, PrivacyPlan
from monai_dp.utils.errors import DPConfigurationError, PrivacyBudgetExhaustedError

Q, DELTA = 0.1, 1e-3


def _budget(sigma=1.0, target=None, planned=100, accountant="rdp"):
    plan = PrivacyPlan.create(target_epsilon=target, noise_multiplier=sigma, delta=DELTA, sample_rate=Q,
                              planned_steps=planned, accountant=accountant, max_grad_norm=1.0, num_units=100)
    return PrivacyBudget(plan)


def test_the_epsilon_gate_refuses_exactly_the_step_that_would_exceed():
    budget = _budget(target=2.0)
    while budget.next_step_verdict().allowed:
        budget.record_step()
    reference = create_accountant("rdp")
    reference.step(1.0, Q, budget.steps)
    assert reference.get_epsilon(DELTA) <= 2.0 < reference.epsilon_after(DELTA, 1.0, Q, 1)
    verdict = budget.next_step_verdict()
    assert verdict.gate == "epsilon" and "one more step would exceed ε = 2" in verdict.message


def test_the_first_refusing_gate_wins_and_a_gate_of_the_same_name_is_replaced():
    budget = _budget(target=50.0)
    budget.add_gate(EpsilonGate(1.0, name="cap"))
    budget.add_gate(EpsilonGate(0.5, name="cap"))  # replaces the cap of 1.0
    assert [g.name for g in budget.gates] == ["epsilon", "cap"]
    while budget.next_step_verdict().allowed:
        budget.record_step()
    assert budget.next_step_verdict().gate == "cap" and budget.get_epsilon() <= 0.5


class _Run:
    run_id, spent_before = 7, 1.5

    def __init__(self, allowed):
        self.allowed_steps, self.claimed, self.status = allowed, 0, None

    def claim_step(self):
        self.claimed += 1

    def finish(self, status):
        self.status = status


class _Ledger:
    path = "ledger.db"

    def budget(self, dataset_id):
        return 8.0, 1e-5

    def spent(self, dataset_id):
        return 3.25, []


def test_a_ledger_gate_claims_before_each_step_and_closes_once():
    budget = _budget()
    budget.record_step()  # a step before the run was charged (a resumed run)
    run = _Run(allowed=3)
    budget.attach_ledger_run(_Ledger(), run, "ds")
    taken = 0
    while budget.next_step_verdict().allowed:
        budget.before_step()
        budget.record_step()
        taken += 1
    assert taken == run.claimed == 3 and budget.next_step_verdict().gate == "ledger"
    budget.finish("stopped")
    budget.finish("failed")  # a second close does nothing
    assert run.status == "stopped" and budget.ledger_info["steps"] == 3 and budget.ledger_info["spent_after"] == 3.25
    assert budget.next_step_verdict().allowed  # a closed run no longer gates (nor claims)


def test_sigma_is_read_from_the_bound_mechanism_and_a_ledger_run_keeps_one_sigma():
    budget = _budget(sigma=2.0)
    current = {"sigma": 2.0}
    budget.bind(mechanism=lambda: (current["sigma"], Q))
    budget.record_step()
    current["sigma"] = 1.0
    budget.record_step()
    assert budget.accountant.history == [(2.0, Q, 1), (1.0, Q, 1)]
    budget.attach_ledger_run(_Ledger(), _Run(10), "ds")
    current["sigma"] = 0.5
    with pytest.raises(DPConfigurationError, match=r"`optimizer.noise_multiplier` must be 1 \(the σ this ledger run"):
        budget.next_step_verdict()


def test_the_plan_calibrates_over_its_own_steps_and_refuses_a_budget_too_small_for_one():
    long = PrivacyPlan.create(target_epsilon=3.0, noise_multiplier=None, delta=DELTA, sample_rate=Q,
                              planned_steps=400, accountant="rdp", max_grad_norm=1.0, num_units=100)
    short = PrivacyPlan.create(target_epsilon=3.0, noise_multiplier=None, delta=DELTA, sample_rate=Q,
                               planned_steps=100, accountant="rdp", max_grad_norm=1.0, num_units=100)
    assert long.noise_multiplier > short.noise_multiplier
    acc = create_accountant("rdp")
    acc.step(long.noise_multiplier, Q, 400)
    assert acc.get_epsilon(DELTA) <= 3.0
    with pytest.raises(PrivacyBudgetExhaustedError, match="`target_epsilon` must be large enough for one step"):
        PrivacyPlan.create(target_epsilon=0.01, noise_multiplier=0.3, delta=DELTA, sample_rate=Q, planned_steps=10,
                           accountant="rdp", max_grad_norm=1.0, num_units=100)


def test_the_budget_module_imports_neither_torch_nor_ignite():
    code = ("import sys, monai_dp.privacy.budget; "
            "assert not {'torch', 'ignite'} & set(sys.modules), sorted({'torch', 'ignite'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ledger_gate_is_a_gate():
    gate = LedgerGate(_Ledger(), _Run(1), "ds", first_step=0)
    assert gate.name == "ledger" and gate.info["budget_epsilon"] == 8.0
