"""DP settings and δ: NumPy scalars are numbers, bools and NaN are not."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from monai_dp.engines.config import DPSettings, resolve_delta
from monai_dp.utils.errors import DPConfigurationError


def settings(**over):
    kw = dict(target_epsilon=None, target_delta=None, noise_multiplier=1.0, max_grad_norm=1.0, accountant="prv",
              max_physical_batch_size=None)
    kw.update(over)
    return DPSettings(**kw)


def test_resolve_delta_takes_numpy_float32():
    delta = resolve_delta(np.float32(1e-5), num_units=1000)
    assert type(delta) is float and math.isclose(delta, 1e-5, rel_tol=1e-6)


def test_resolve_delta_takes_numpy_float64_and_int_n():
    assert resolve_delta(np.float64(1e-6), num_units=np.int64(100)) == 1e-6


@pytest.mark.parametrize("value, name", [(True, "bool"), (np.bool_(False), "bool"), ("1e-5", "str")])
def test_resolve_delta_refuses_non_numbers(value, name):
    with pytest.raises(TypeError, match=rf"`target_delta` must be a number, got '{name}'"):
        resolve_delta(value, num_units=1000)


@pytest.mark.parametrize("value", [float("nan"), np.float32("nan"), 0.0, np.float32(0.001)])
def test_resolve_delta_refuses_nan_and_out_of_range(value):
    with pytest.raises(ValueError, match=r"`target_delta` must be in \(0, 1/N\) = \(0, 0.001\) for N = 1000 records"):
        resolve_delta(value, num_units=1000)


def test_resolve_delta_default_and_warning(caplog):
    assert resolve_delta(None, num_units=10) == 1e-5
    assert resolve_delta(None, num_units=1_000_000) == 1e-7
    with caplog.at_level(logging.WARNING):
        resolve_delta(0.05, num_units=10)
    assert "above 1/(10 N)" in caplog.text


def test_settings_take_numpy_scalars():
    s = settings(target_epsilon=np.float32(3.0), noise_multiplier=np.float32(1.1), max_grad_norm=np.float64(0.5),
                 max_physical_batch_size=np.int64(8))
    assert type(s.target_epsilon) is float and math.isclose(s.target_epsilon, 3.0)
    assert type(s.noise_multiplier) is float and math.isclose(s.noise_multiplier, 1.1, rel_tol=1e-6)
    assert s.max_grad_norm == 0.5


@pytest.mark.parametrize("field", ["target_epsilon", "noise_multiplier", "max_grad_norm"])
def test_settings_refuse_bool_and_nan(field):
    with pytest.raises(TypeError, match=rf"`{field}` must be a number, got 'bool'"):
        settings(**{field: True})
    with pytest.raises(ValueError, match=rf"`{field}` must be a finite number > 0, got nan"):
        settings(**{field: np.float32("nan")})


def test_gdp_is_refused_saying_how_much_it_under_reports():
    match = (r"`accountant` must be 'prv', 'pld' or 'rdp' unless `allow_approximate_accounting=True`, got 'gdp'. "
             r".*can under-report ε by 15 % and more \(19 % at q = 0.1, σ = 1.025, 30 steps, δ = 1e-3")
    with pytest.raises(DPConfigurationError, match=match):
        settings(accountant="gdp")


def test_gdp_under_reports_by_more_than_15_percent_against_dp_accounting():
    """The known case behind the refusal (docs/privacy.md, benchmarks/gdp_error.py): PLD ε 2.45, GDP ε 2.00."""
    dp_accounting = pytest.importorskip("dp_accounting")
    from monai_dp.privacy import create_accountant

    q, sigma, steps, delta = 0.1, 1.025, 30, 1e-3
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    tight = pld.get_epsilon(delta)
    gdp = create_accountant("gdp")
    gdp.step(sigma, q, steps)
    approx = gdp.get_epsilon(delta)
    assert 2.3 < tight < 2.6  # a pessimistic PLD bound: the true ε is at most this, and not far below
    assert approx < 0.85 * tight
    ours = create_accountant("pld")
    ours.step(sigma, q, steps)
    assert ours.get_epsilon(delta) == pytest.approx(tight, rel=1e-3)
