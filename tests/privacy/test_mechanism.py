"""The step type, its validation, and the one step search every accountant, the PLD budget and the ledger use."""

from __future__ import annotations

import math

import pytest

from monai_dp.privacy import Mechanism, largest_passing
from monai_dp.privacy.mechanism import check_entry, merge_entry


def _counting(boundary):
    calls = []

    def ok(k):
        calls.append(k)
        return k <= boundary

    return ok, calls


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 7, 8, 9, 100])
def test_largest_passing_finds_every_boundary_from_every_start(limit):
    for boundary in range(limit + 2):
        for start in range(limit + 1):
            ok, calls = _counting(boundary)
            assert largest_passing(ok, limit, start=start) == min(boundary, limit), (boundary, start)
            assert 0 not in calls  # ok(0) is assumed, never asked
            assert all(0 <= k <= limit for k in calls)


def test_largest_passing_from_zero_is_logarithmic():
    for boundary in (1, 5, 100, 4097, 123_456):
        ok, calls = _counting(boundary)
        assert largest_passing(ok, 10**6) == boundary
        assert len(calls) <= 2 * math.log2(boundary) + 3


def test_largest_passing_from_a_fitting_limit_asks_once_and_walks_down_in_few_steps():
    ok, calls = _counting(1000)
    assert largest_passing(ok, 1000, start=1000) == 1000 and calls == [1000]
    ok, calls = _counting(997)
    assert largest_passing(ok, 1000, start=1000) == 997
    assert calls[:3] == [1000, 999, 998] and len(calls) <= 6
    ok, calls = _counting(3)
    assert largest_passing(ok, 1000, start=1000) == 3 and len(calls) <= 2 * math.log2(1000) + 3


def test_largest_passing_start_beyond_limit_is_clamped():
    ok, _ = _counting(2)
    assert largest_passing(ok, 5, start=50) == 2


@pytest.mark.parametrize("kwargs, err, match", [
    ({"limit": -1}, ValueError, r"`limit` must be an int >= 0, got -1\."),
    ({"limit": 2.0}, TypeError, r"`limit` must be an int, got 'float'\."),
    ({"limit": 3, "start": -1}, ValueError, r"`start` must be an int >= 0, got -1\."),
])
def test_largest_passing_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        largest_passing(lambda k: True, **kwargs)


def test_mechanism_checked_converts_and_validates():
    m = Mechanism.checked((1, 0.5, 3))
    assert m == Mechanism(1.0, 0.5, 3, 1) and type(m.noise_multiplier) is float and type(m.steps) is int
    assert Mechanism.checked([2, 1, 0, 4]) == Mechanism(2.0, 1.0, 0, 4)
    with pytest.raises(ValueError, match=r"`group_size` must be an int >= 1, got 0\."):
        Mechanism.checked((1.0, 0.1, 3, 0))
    with pytest.raises(ValueError, match=r"`steps` must be an int >= 1, got 0\."):
        Mechanism.checked((1.0, 0.1, 0), min_steps=1)
    with pytest.raises(ValueError, match=r"`sample_rate` must be in \(0, 1\], got 1.5\."):
        Mechanism.checked((1.0, 1.5, 3))


def test_entry_round_trip_and_groups_have_no_entry():
    assert Mechanism.from_entry((1.5, 0.1, 7)) == Mechanism(1.5, 0.1, 7, 1)
    assert Mechanism(1.5, 0.1, 7).entry == (1.5, 0.1, 7)
    with pytest.raises(ValueError, match=r"`group_size` must be 1 for an accountant's history entry, got 3\."):
        _ = Mechanism(1.5, 0.1, 7, 3).entry


def test_merge_entry():
    history = []
    for entry in [(1.0, 0.1, 2), (1.0, 0.1, 0), (1.0, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.1, 1)]:
        merge_entry(history, check_entry(*entry, min_steps=0))
    assert history == [(1.0, 0.1, 5), (2.0, 0.1, 1), (1.0, 0.1, 1)]
