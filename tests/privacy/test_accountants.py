"""Contract suite over every accountant, known answers, and cross-checks against Google's dp_accounting."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import warnings

import pytest
import torch

from monai_dp.privacy import (
    ACCOUNTANTS,
    DPAccountant,
    GDPAccountant,
    PRVAccountant,
    RDPAccountant,
    accountant_prv,
    accountant_rdp,
    create_accountant,
)

dp_accounting = pytest.importorskip("dp_accounting")

DELTA = 1e-5


def _dpa_event(history):
    events = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n) for sigma, q, n in history]
    return dp_accounting.ComposedDpEvent(events)


def dpa_pld(history, delta=DELTA):
    """dp_accounting's PLD (pessimistic discretisation at 1e-4): within about 1e-3 of the exact ε, from above."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    return acc.compose(_dpa_event(history)).get_epsilon(delta)


def dpa_rdp(history, delta=DELTA):
    acc = dp_accounting.rdp.RdpAccountant()
    return acc.compose(_dpa_event(history)).get_epsilon(delta)


@pytest.fixture(params=ACCOUNTANTS)
def accountant(request) -> DPAccountant:
    return create_accountant(request.param)


# ---------------------------------------------------------------- contract, every accountant
def test_zero_steps_give_zero_epsilon(accountant):
    assert accountant.steps == 0 and accountant.history == []
    assert accountant.get_epsilon(DELTA) == 0.0
    assert accountant.epsilon_after(DELTA, 1.0, 0.1, 0) == 0.0


def test_epsilon_strictly_grows_with_steps(accountant):
    eps = []
    for _ in range(4):
        accountant.step(1.0, 0.05, num_steps=50)
        eps.append(accountant.get_epsilon(DELTA))
    assert eps[0] > 0
    assert all(b > a for a, b in itertools.pairwise(eps))
    assert accountant.steps == 200


def test_history_merges_consecutive_equal_mechanisms(accountant):
    accountant.step(1.0, 0.05, 3)
    accountant.step(1, 0.05, 2)  # int σ equals float σ
    accountant.step(1.2, 0.05)
    accountant.step(1.0, 0.05)
    assert accountant.history == [(1.0, 0.05, 5), (1.2, 0.05, 1), (1.0, 0.05, 1)]
    assert accountant.steps == 7


def test_state_round_trips_through_weights_only_load(accountant, tmp_path):
    accountant.step(1.1, 0.02, 100)
    accountant.step(0.9, 0.02, 30)
    state = accountant.state_dict()
    assert state == {"accountant": accountant.name, "history": [[1.1, 0.02, 100], [0.9, 0.02, 30]]}
    torch.save(state, tmp_path / "acc.pt")
    other = create_accountant(accountant.name)
    other.load_state_dict(torch.load(tmp_path / "acc.pt", weights_only=True))
    assert other.history == accountant.history and other.steps == 130
    assert other.get_epsilon(DELTA) == accountant.get_epsilon(DELTA) > 0


def test_failed_load_leaves_the_history_unchanged(accountant):
    accountant.step(1.0, 0.1, 5)
    with pytest.raises(ValueError):
        accountant.load_state_dict({"accountant": accountant.name, "history": [[1.0, 0.1, 2], [1.0, 2.0, 1]]})
    assert accountant.history == [(1.0, 0.1, 5)]


def test_epsilon_after_does_not_mutate_and_equals_stepping(accountant):
    accountant.step(1.0, 0.04, 20)
    after_same = accountant.epsilon_after(DELTA, 1.0, 0.04, 30)
    after_other = accountant.epsilon_after(DELTA, 1.5, 0.08, 30)
    assert accountant.history == [(1.0, 0.04, 20)]
    same, other = create_accountant(accountant.name), create_accountant(accountant.name)
    same.step(1.0, 0.04, 50)
    other.step(1.0, 0.04, 20)
    other.step(1.5, 0.08, 30)
    assert after_same == same.get_epsilon(DELTA)
    assert after_other == other.get_epsilon(DELTA)


def test_max_extra_steps_is_the_exact_boundary(accountant):
    accountant.step(1.0, 0.05, 10)
    k = accountant.max_extra_steps(4.0, DELTA, 1.0, 0.05, limit=10_000)
    assert 0 < k < 10_000
    assert accountant.epsilon_after(DELTA, 1.0, 0.05, k) <= 4.0 < accountant.epsilon_after(DELTA, 1.0, 0.05, k + 1)
    assert accountant.history == [(1.0, 0.05, 10)]
    assert accountant.max_extra_steps(4.0, DELTA, 1.0, 0.05, limit=3) == 3
    assert accountant.max_extra_steps(4.0, DELTA, 1.0, 0.05, limit=0) == 0
    spent = accountant.get_epsilon(DELTA)
    assert accountant.max_extra_steps(spent / 2, DELTA, 1.0, 0.05, limit=100) == 0  # already over the target


def test_max_extra_steps_is_cached(accountant, monkeypatch):
    calls = []
    compute = type(accountant).compute_epsilon

    def counting(history, delta):
        calls.append(history)
        return compute(history, delta)

    monkeypatch.setattr(type(accountant), "compute_epsilon", staticmethod(counting))
    accountant.step(1.2345, 0.0321, 7)  # a history no other test queries
    first = accountant.max_extra_steps(3.0, DELTA, 1.2345, 0.0321, limit=5000)
    n_first = len(calls)
    assert n_first > 0 and accountant.max_extra_steps(3.0, DELTA, 1.2345, 0.0321, limit=5000) == first
    assert len(calls) == n_first
    assert n_first <= 2 * math.log2(first) + 4  # exponential + binary search, not a scan


def test_heterogeneous_history_composes_every_entry(accountant):
    accountant.step(0.8, 0.05, 100)
    accountant.step(2.0, 0.05, 100)
    first_only, last_only = create_accountant(accountant.name), create_accountant(accountant.name)
    first_only.step(0.8, 0.05, 100)
    last_only.step(2.0, 0.05, 100)
    assert accountant.get_epsilon(DELTA) > first_only.get_epsilon(DELTA) > last_only.get_epsilon(DELTA)


def test_zero_noise_gives_infinite_epsilon(accountant):
    accountant.step(1.0, 0.1, 10)
    accountant.step(0.0, 0.1, 1)
    assert math.isinf(accountant.get_epsilon(DELTA))
    assert accountant.max_extra_steps(100.0, DELTA, 1.0, 0.1, limit=10) == 0


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda a: a.step(-1.0, 0.1), ValueError, r"`noise_multiplier` must be a finite number >= 0, got -1.0\."),
        (lambda a: a.step(math.nan, 0.1), ValueError, r"`noise_multiplier` must be a finite number >= 0, got nan\."),
        (lambda a: a.step(math.inf, 0.1), ValueError, r"`noise_multiplier` must be a finite number >= 0, got inf\."),
        (lambda a: a.step("1", 0.1), TypeError, r"`noise_multiplier` must be a number, got 'str'\."),
        (lambda a: a.step(1.0, 0.0), ValueError, r"`sample_rate` must be in \(0, 1\], got 0.0\."),
        (lambda a: a.step(1.0, 1.5), ValueError, r"`sample_rate` must be in \(0, 1\], got 1.5\."),
        (lambda a: a.step(1.0, math.nan), ValueError, r"`sample_rate` must be in \(0, 1\], got nan\."),
        (lambda a: a.step(1.0, 0.1, 0), ValueError, r"`num_steps` must be an int >= 1, got 0\."),
        (lambda a: a.step(1.0, 0.1, 2.0), TypeError, r"`num_steps` must be an int, got 'float'\."),
        (lambda a: a.step(1.0, 0.1, True), TypeError, r"`num_steps` must be an int, got 'bool'\."),
        (lambda a: a.get_epsilon(0.0), ValueError, r"`delta` must be in \(0, 1\), got 0.0\."),
        (lambda a: a.get_epsilon(1.0), ValueError, r"`delta` must be in \(0, 1\), got 1.0\."),
        (lambda a: a.epsilon_after(1e-5, 1.0, 0.1, -1), ValueError, r"`extra_steps` must be an int >= 0, got -1\."),
        (lambda a: a.max_extra_steps(0.0, 1e-5, 1.0, 0.1, 10), ValueError,
         r"`target_epsilon` must be a finite number > 0, got 0.0\."),
        (lambda a: a.max_extra_steps(1.0, 1e-5, 1.0, 0.1, -1), ValueError, r"`limit` must be an int >= 0, got -1\."),
        (lambda a: a.max_extra_steps(1.0, 2.0, 1.0, 0.1, 10), ValueError, r"`delta` must be in \(0, 1\), got 2.0\."),
    ],
)
def test_bad_arguments(accountant, call, err, match):
    with pytest.raises(err, match=match):
        call(accountant)


@pytest.mark.parametrize(
    "state, err, match",
    [
        ([], TypeError, r"`state` must be a dict, got 'list'\."),
        ({"history": []}, ValueError, r"`state` must be a dict with keys 'accountant' and 'history', got \['history'\]"),
        ({"accountant": "{other}", "history": []}, ValueError,
         (r"`state\['accountant'\]` must be '{name}' to load into \w+Accountant, got '{other}'\. "
          r"Load it with create_accountant\('{other}'\) instead\.")),
        ({"accountant": "{name}", "history": "x"}, TypeError, r"`state\['history'\]` must be a list, got 'str'\."),
        ({"accountant": "{name}", "history": [[1.0, 0.1]]}, ValueError,
         r"`state\['history'\]\[0\]` must be \[noise_multiplier, sample_rate, num_steps\], got \[1.0, 0.1\]\."),
        ({"accountant": "{name}", "history": [[1.0, 0.1, 1], [1.0, 0.1, 0]]}, ValueError,
         r"`state\['history'\]\[1\]` must be a valid .*, got \[1.0, 0.1, 0\]\. `num_steps` must be an int >= 1"),
    ],
)
def test_load_state_dict_refuses_bad_state(accountant, state, err, match):
    other = next(n for n in ACCOUNTANTS if n != accountant.name)
    if isinstance(state, dict):
        state = {k: v.format(name=accountant.name, other=other) if isinstance(v, str) else v for k, v in state.items()}
    with pytest.raises(err, match=match.format(name=accountant.name, other=other)):
        accountant.load_state_dict(state)


@pytest.mark.parametrize("name, cls", [("rdp", RDPAccountant), ("PRV", PRVAccountant), ("Gdp", GDPAccountant)])
def test_create_accountant(name, cls):
    acc = create_accountant(name)
    assert type(acc) is cls and acc.name == name.lower()


def test_unknown_accountant():
    with pytest.raises(ValueError, match=r"`accountant` must be one of \['rdp', 'prv', 'gdp', 'pld'\], got 'moments'\."):
        create_accountant("moments")


def test_import_loads_neither_ignite_nor_torch_nn():
    code = ("import sys, monai_dp.privacy; bad = [m for m in sys.modules if m.split('.')[0] == 'ignite' "
            "or m == 'torch.nn' or m.startswith('torch.nn.')]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- known answers and independent references
def test_prv_known_answer_is_an_upper_bound_close_to_pld():
    """q = 0.032, σ = 1, T = 1563 (CIFAR-10, batch 1600, 50 epochs), δ = 1e-5: ε ≈ 8.41."""
    acc = create_accountant("prv")
    acc.step(1.0, 0.032, 1563)
    eps = acc.get_epsilon(DELTA)
    ref = dpa_pld([(1.0, 0.032, 1563)])
    assert ref == pytest.approx(8.41, abs=0.01)
    # PRV returns estimate + eps_error (0.01); the fine PLD is within ~1e-3 of the exact ε
    assert ref <= eps <= ref + 0.02


@pytest.mark.parametrize("history", [[(0.8, 0.01, 5000)], [(2.0, 0.1, 300)], [(1.0, 0.02, 400), (3.0, 0.1, 200)]])
def test_prv_agrees_with_dp_accounting_pld(history):
    acc = create_accountant("prv")
    for entry in history:
        acc.step(*entry)
    ref = dpa_pld(history)
    assert ref <= acc.get_epsilon(DELTA) <= ref * 1.02


@pytest.mark.parametrize("history", [[(1.0, 0.032, 1563)], [(0.8, 0.01, 5000)], [(2.0, 0.1, 300)],
                                     [(5.0, 0.01, 1000)], [(1.0, 0.02, 400), (3.0, 0.1, 200)]])
def test_rdp_agrees_with_dp_accounting_rdp(history):
    acc = create_accountant("rdp")
    for entry in history:
        acc.step(*entry)
    # Same bound, slightly different order grids (Opacus has no order 11; we add dp_accounting's 128..1024)
    # and RDP-to-DP conversions: observed differences are below 0.05 %; 1 % leaves room for either to change.
    assert acc.get_epsilon(DELTA) == pytest.approx(dpa_rdp(history), rel=0.01)


def test_rdp_is_looser_than_prv():
    prv, rdp = create_accountant("prv"), create_accountant("rdp")
    prv.step(1.0, 0.032, 1563)
    rdp.step(1.0, 0.032, 1563)
    assert rdp.get_epsilon(DELTA) > prv.get_epsilon(DELTA) * 1.05


def _analytic_gdp_epsilon(history, delta):
    """ε of μ-GDP with μ² = Σ q² T (e^{1/σ²} − 1), solving δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    mu = math.sqrt(sum(q * q * n * (math.exp(1 / sigma**2) - 1) for sigma, q, n in history))
    return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 100,
                  xtol=1e-12)


@pytest.mark.parametrize("history", [[(1.0, 0.01, 3000)], [(0.7, 0.004, 20_000)], [(1.0, 0.02, 400), (3.0, 0.1, 200)]])
def test_gdp_matches_the_analytic_formula(history):
    acc = create_accountant("gdp")
    for entry in history:
        acc.step(*entry)
    assert acc.get_epsilon(DELTA) == pytest.approx(_analytic_gdp_epsilon(history, DELTA), rel=1e-6)


def test_gdp_equals_opacus_gaussian_accountant_on_one_mechanism():
    from opacus.accountants import GaussianAccountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns on construction that GDP is experimental
        reference = GaussianAccountant()
    reference.history = [(1.0, 0.01, 3000)]
    acc = create_accountant("gdp")
    acc.step(1.0, 0.01, 3000)
    assert acc.get_epsilon(DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)


def test_prv_falls_back_to_rdp_where_opacus_fails():
    acc = create_accountant("prv")
    acc.step(1.0, 0.01, 1000)
    with pytest.warns(RuntimeWarning, match="Opacus raised ValueError: Floating point errors will dominate"):
        eps = acc.get_epsilon(1e-15)
    assert eps == RDPAccountant.compute_epsilon(((1.0, 0.01, 1000),), 1e-15)


def test_prv_widens_its_error_bracket_instead_of_building_a_huge_grid(monkeypatch):
    history = ((1.0, 0.02, 400), (3.0, 0.1, 200))
    tight = PRVAccountant.compute_epsilon(history, DELTA)
    monkeypatch.setattr(accountant_prv, "PRV_MAX_GRID", 2**12)
    domain = accountant_prv.prv_domain(history, DELTA / 1000)
    assert accountant_prv.prv_eps_error(history, DELTA / 1000, domain) > 0.05
    wide = PRVAccountant.compute_epsilon(history, DELTA)
    assert tight < wide < tight + 1.0  # still a valid upper bound, only looser


def test_prv_hands_huge_epsilon_to_rdp():
    history = ((0.125, 0.02, 500),)  # ε ≈ 1900: Opacus' PRV would return inf after seconds
    with pytest.warns(RuntimeWarning, match="privacy loss domain exceeds PRV_MAX_DOMAIN"):
        eps = PRVAccountant.compute_epsilon(history, DELTA)
    assert eps == RDPAccountant.compute_epsilon(history, DELTA)


HISTORIES = [((1.0, 64 / 450, 100),), ((2.457, 4096 / 60000, 560),), ((0.8, 0.01, 3000),),
             ((1.0, 0.1, 5), (3.0, 0.02, 700))]


@pytest.mark.parametrize("history", HISTORIES)
def test_cached_prv_and_rdp_equal_opacus_own(history):
    """The cached RDP vectors and the assembled PRV computation give exactly Opacus' numbers."""
    from opacus.accountants import PRVAccountant as OpacusPRV
    from opacus.accountants import RDPAccountant as OpacusRDP
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    prv, rdp = OpacusPRV(), OpacusRDP()
    prv.history, rdp.history = list(history), list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert PRVAccountant.compute_epsilon(history, 1e-5) == prv.get_epsilon(1e-5, eps_error=0.01, delta_error=1e-8)
        assert RDPAccountant.compute_epsilon(history, 1e-5) == rdp.get_epsilon(
            1e-5, alphas=list(OpacusRDP.DEFAULT_ALPHAS) + list(accountant_rdp.RDP_EXTRA_ORDERS))
        domain = compute_safe_domain_size([PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
                                          [n for _, _, n in history], 0.01, 1e-8)
    assert accountant_prv.prv_domain(history, 1e-8) == domain


def test_a_growing_history_reuses_the_rdp_vectors():
    accountant_rdp.rdp_per_step.cache_clear()
    acc = PRVAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.1, sample_rate=0.05, num_steps=10)
        acc.get_epsilon(1e-5)
    info = accountant_rdp.rdp_per_step.cache_info()
    assert info.misses == 1 and info.hits >= 5  # one (σ, q) pair: computed once, then read
