"""The interface every accountant implements: a merged history of steps and the ε it spends.

A subclass sets ``name`` and ``is_upper_bound`` and implements :meth:`DPAccountant.compute_epsilon`; it becomes
available by name through :func:`monai_dp.privacy.registry.register_accountant`. Results are cached on the
history, so repeated queries (budget checks, logging) cost nothing.
"""

from __future__ import annotations

import math
from functools import lru_cache

from monai_dp.privacy.mechanism import (
    Entry,
    History,
    check_entry,
    largest_passing,
    merge_entry,
)
from monai_dp.utils.validation import (
    check_open_unit_interval,
    check_positive,
    error_message,
)

__all__ = ["DPAccountant"]


@lru_cache(maxsize=4096)
def _cached_epsilon(cls: type[DPAccountant], history: History, delta: float) -> float:
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    eps = float(cls.compute_epsilon(history, delta))
    return math.inf if math.isnan(eps) else max(eps, 0.0)


@lru_cache(maxsize=1024)
def _cached_max_extra_steps(cls: type[DPAccountant], history: History, target_epsilon: float, delta: float,
                            entry: tuple[float, float], limit: int) -> int:
    def ok(k: int) -> bool:
        extended = list(history)
        merge_entry(extended, (entry[0], entry[1], k))
        return _cached_epsilon(cls, tuple(extended), delta) <= target_epsilon

    return largest_passing(ok, limit)


class DPAccountant:
    """Base accountant: a merged history of sampled Gaussian mechanism steps and the ε it spends.

    Attributes:
        name: the registered name (``"rdp"``, ``"prv"``, ``"gdp"``, ``"pld"``); stored in :meth:`state_dict`
            and checked on load.
        is_upper_bound: whether ε is a guaranteed upper bound; ``False`` for an approximation (``"gdp"``),
            which training refuses unless approximate accounting is allowed.
        history: ``(noise_multiplier, sample_rate, num_steps)`` entries, consecutive equal (σ, q) merged.
    """

    name: str = ""
    is_upper_bound: bool = True

    def __init__(self) -> None:
        self.history: list[Entry] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, history={self.history})"

    @staticmethod
    def compute_epsilon(history: History, delta: float) -> float:
        """ε of a non-empty history with every σ > 0, at ``delta``."""
        raise NotImplementedError

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(int(n) for _, _, n in self.history)

    def _history(self) -> History:
        return tuple(tuple(entry) for entry in self.history)  # type: ignore[misc]

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps with noise multiplier σ and Poisson sample rate q."""
        merge_entry(self.history, check_entry(noise_multiplier, sample_rate, num_steps))

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``: 0 with no steps, ``inf`` if a step had σ = 0."""
        delta = check_open_unit_interval("delta", delta)
        return _cached_epsilon(type(self), self._history(), delta)

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float, extra_steps: int) -> float:
        """ε if ``extra_steps`` more steps of (σ, q) were taken; the accountant is not changed."""
        delta = check_open_unit_interval("delta", delta)
        history = list(self._history())
        merge_entry(history, check_entry(noise_multiplier, sample_rate, extra_steps, "extra_steps", 0))
        return _cached_epsilon(type(self), tuple(history), delta)

    def max_extra_steps(self, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
                        limit: int) -> int:
        """Largest ``k`` in ``[0, limit]`` with ``epsilon_after(delta, σ, q, k) <= target_epsilon``.

        ε grows with the number of steps, so :func:`~monai_dp.privacy.mechanism.largest_passing` finds the
        boundary with about ``2 log2(k)`` queries. Returns 0 when the recorded history alone exceeds the target.
        """
        target_epsilon = check_positive("target_epsilon", target_epsilon)
        delta = check_open_unit_interval("delta", delta)
        sigma, q, limit = check_entry(noise_multiplier, sample_rate, limit, "limit", 0)
        return _cached_max_extra_steps(type(self), self._history(), target_epsilon, delta, (sigma, q), limit)

    def state_dict(self) -> dict:
        """``{"accountant": name, "history": [[σ, q, n], ...]}``, plain types (``torch.load(weights_only=True)``)."""
        return {"accountant": self.name, "history": [[float(s), float(q), int(n)] for s, q, n in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the history with one saved by :meth:`state_dict` of the same accountant type."""
        if not isinstance(state, dict):
            raise TypeError(error_message("state", "a dict", type(state).__name__))
        if "accountant" not in state or "history" not in state:
            raise ValueError(error_message("state", "a dict with keys 'accountant' and 'history'", list(state)))
        if state["accountant"] != self.name:
            raise ValueError(error_message(
                "state['accountant']", f"{self.name!r} to load into {type(self).__name__}", state["accountant"],
                f"Load it with create_accountant({state['accountant']!r}) instead."))
        if not isinstance(state["history"], (list, tuple)):
            raise TypeError(error_message("state['history']", "a list", type(state["history"]).__name__))
        history: list[Entry] = []
        for i, entry in enumerate(state["history"]):
            constraint = "[noise_multiplier, sample_rate, num_steps]"
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(error_message(f"state['history'][{i}]", constraint, entry))
            try:
                merge_entry(history, check_entry(*entry))
            except (TypeError, ValueError) as err:
                raise ValueError(error_message(f"state['history'][{i}]", f"a valid {constraint}", entry,
                                               str(err))) from err
        self.history = history
