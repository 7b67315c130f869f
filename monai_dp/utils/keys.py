"""Names that monai_dp writes on an Ignite engine's ``state``, in one place.

Like MONAI's ``CommonKeys``: plain ``str`` class constants, so they work with ``setattr``/``getattr`` and in
bundle configs (``state_attributes=["dp_steps", ...]``) without conversion.
"""

from __future__ import annotations

__all__ = ["DPKeys"]


class DPKeys:
    """Attributes of ``engine.state`` set by the DP handlers, and the default metrics key of ε.

    - ``EPSILON``: ``engine.state.metrics[EPSILON]``, ε spent so far (at δ ``DELTA``).
    - ``STEPS``: noisy logical steps taken so far.
    - ``EPSILON_STEPS``: the step count at which the published ε was computed.
    - ``DELTA``, ``NOISE_MULTIPLIER``, ``SAMPLE_RATE``, ``MAX_GRAD_NORM``: the mechanism's parameters.
    - ``BUDGET_EXHAUSTED``: ``True`` once training stopped because the next step would exceed the budget.
    - ``STOPPED_BY``: the name of the budget gate that refused the next step (e.g. ``"epsilon"``, a ledger run).
    - ``COUNTERS``: what the metrics handler publishes every iteration, in the order bundles log them
      (pass it as ``state_attributes`` to MONAI's ``StatsHandler``/``TensorBoardStatsHandler``/``MLFlowHandler``).
    """

    EPSILON = "epsilon"
    STEPS = "dp_steps"
    EPSILON_STEPS = "dp_epsilon_steps"
    DELTA = "dp_delta"
    NOISE_MULTIPLIER = "dp_noise_multiplier"
    SAMPLE_RATE = "dp_sample_rate"
    MAX_GRAD_NORM = "dp_max_grad_norm"
    BUDGET_EXHAUSTED = "dp_budget_exhausted"
    STOPPED_BY = "dp_stopped_by"
    COUNTERS = (STEPS, EPSILON_STEPS, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE, MAX_GRAD_NORM)
