"""The argument checks: one message template, NumPy scalars accepted, bools and NaN refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monai_dp.utils.validation import (
    check_non_negative,
    check_open_unit_interval,
    check_positive,
    check_positive_int,
    check_sample_rate,
    error_message,
    is_integer,
    is_real,
)


def test_message_template():
    assert error_message("x", "a number > 0", -1, "Use 1.") == "`x` must be a number > 0, got -1. Use 1."
    assert error_message("x", "finite", np.float32("nan")) == "`x` must be finite, got nan."


@pytest.mark.parametrize("value", [np.float32(0.5), np.float16(0.5), np.float64(0.5), np.int64(3), np.int32(1), 2, 0.25])
def test_numpy_real_scalars_are_numbers(value):
    assert is_real(value)
    out = check_positive("x", value)
    assert type(out) is float and math.isclose(out, float(value))
    assert check_non_negative("x", value) == out


def test_open_unit_interval_takes_float32():
    out = check_open_unit_interval("delta", np.float32(1e-5))
    assert type(out) is float and math.isclose(out, 1e-5, rel_tol=1e-6)


@pytest.mark.parametrize("value", [True, np.bool_(True), "0.5", None, [0.5]])
def test_non_numbers_are_refused(value):
    assert not is_real(value)
    with pytest.raises(TypeError, match=r"`x` must be a number, got '(bool|str|NoneType|list)'"):
        check_positive("x", value)


@pytest.mark.parametrize("value", [float("nan"), np.float32("nan"), np.float64("inf"), 0.0, np.float32(-1)])
def test_nan_inf_and_non_positive_are_refused(value):
    with pytest.raises(ValueError, match=r"`x` must be a finite number > 0, got"):
        check_positive("x", value)


@pytest.mark.parametrize("value", [float("nan"), np.float32("nan"), 0.0, 1.0])
def test_open_unit_interval_refuses_nan_and_ends(value):
    with pytest.raises(ValueError, match=r"`delta` must be in \(0, 1\), got"):
        check_open_unit_interval("delta", value)


def test_positive_int_takes_numpy_ints_and_refuses_bools_and_floats():
    out = check_positive_int("n", np.int64(4))
    assert type(out) is int and out == 4
    assert is_integer(np.int32(2)) and not is_integer(True) and not is_integer(2.0)
    with pytest.raises(TypeError, match=r"`n` must be an int, got 'bool'"):
        check_positive_int("n", True)
    with pytest.raises(TypeError, match=r"`n` must be an int, got 'float'"):
        check_positive_int("n", 4.0)
    with pytest.raises(ValueError, match=r"`n` must be an int >= 1, got 0"):
        check_positive_int("n", np.int64(0))


@pytest.mark.parametrize("value", [1, 1.0, 0.5, np.float32(0.25), 1e-9])
def test_sample_rate_accepts_the_half_open_unit_interval(value):
    out = check_sample_rate(value)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.0000001, 2, float("nan"), float("inf")])
def test_sample_rate_outside_zero_one_is_refused_with_its_value(value):
    with pytest.raises(ValueError, match=r"^`sampler.sample_rate` must be in \(0, 1\], got .*\. Lower it\.$"):
        check_sample_rate(value, "sampler.sample_rate", "Lower it.")


@pytest.mark.parametrize("value", [True, "0.5", None])
def test_sample_rate_must_be_a_number(value):
    with pytest.raises(TypeError, match=rf"^`sample_rate` must be a number, got '{type(value).__name__}'\.$"):
        check_sample_rate(value)
