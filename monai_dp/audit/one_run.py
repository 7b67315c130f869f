"""Privacy auditing with one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

``m`` canaries are each put into the training data independently with probability 1/2; the model is
trained once; the auditor scores every canary (a black-box score such as the logit confidence of a
canary image, or a white-box one such as a parameter's movement) and guesses "in" for the ``k_pos``
highest scores and "out" for the ``k_neg`` lowest, abstaining on the rest. Under (ε, δ)-DP the number
``v`` of correct guesses out of ``r = k_pos + k_neg`` is at most that of ε-randomised response plus a δ
term: ``P[V ≥ v] ≤ P[Bin(r, q) ≥ v] + 2 m δ max_{1≤i≤v} P[v − i ≤ Bin(r, q) < v] / i`` with
``q = e^ε / (1 + e^ε)``. The largest ε this rejects at the chosen confidence is an empirical lower bound
on the ε of that run: it can never exceed a correct accountant's ε (beyond the 1 − confidence chance),
and it is capped by the number of guesses, so audit at small ε.

:func:`dirac_one_run_audit` applies this to the real trainer with white-box Dirac canaries (each on its
own coordinate, q = 1), where the canaries' scores also give μ̂ of the μ-GDP mechanism.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats

from monai_dp.utils.validation import error_message

__all__ = ["dirac_one_run_audit", "one_run_epsilon", "one_run_p_value"]


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` (``m`` canaries) under (ε, δ)-DP."""
    if not (0 <= v <= r <= m):
        raise ValueError(error_message("(m, r, v)", "0 <= v <= r <= m", (m, r, v)))
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(error_message("(epsilon, delta)", "epsilon >= 0 and 0 <= delta <= 1", (epsilon, delta)))
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, beta)
    pmf = stats.binom.pmf(np.arange(v), r, q)[::-1]  # P[Bin = v-1], P[Bin = v-2], ...
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, beta + 2 * m * delta * alpha)


def one_run_epsilon(scores, included, k_pos: int, k_neg: int = 0, delta: float = 0.0,
                    confidence: float = 0.95) -> dict:
    """Empirical lower bound on ε from one run: guess "in" for the ``k_pos`` top scores, "out" for ``k_neg`` bottom.

    Returns ``{"epsilon_lower": ..., "correct": v, "guesses": r, "canaries": m}``.
    """
    s, inc = np.asarray(scores, float), np.asarray(included, bool)
    m = len(s)
    if inc.shape != s.shape:
        raise ValueError(error_message("included", f"one bool per score ({m})", inc.shape))
    if not (0 <= k_pos and 0 <= k_neg and k_pos + k_neg <= m and k_pos + k_neg > 0):
        raise ValueError(error_message("(k_pos, k_neg)", f"non-negative with 0 < k_pos + k_neg <= {m}",
                                       (k_pos, k_neg)))
    order = np.argsort(-s, kind="stable")
    v = int(inc[order[:k_pos]].sum() + (~inc[order[m - k_neg :]]).sum())
    r = k_pos + k_neg
    level = 1 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(m, r, v, eps, delta) < level

    if not rejected(0.0):
        eps = 0.0
    else:
        hi = 1.0
        while rejected(hi) and hi < 100:
            hi *= 2
        eps = hi if rejected(hi) else optimize.brentq(lambda e: one_run_p_value(m, r, v, e, delta) - level, 0.0, hi,
                                                      xtol=1e-6)
    return {"epsilon_lower": float(eps), "correct": v, "guesses": r, "canaries": m}


def dirac_one_run_audit(m: int = 1000, steps: int = 1, noise_multiplier: float = 4.0, max_grad_norm: float = 1.0,
                        k_pos: int | None = None, k_neg: int | None = None, delta: float = 0.0,
                        confidence: float = 0.95, others: int = 7, mutate=None, seed: int = 0) -> dict:
    """One training run through ``DPSupervisedTrainer`` with ``m`` Dirac canaries, each included w.p. 1/2.

    Canary ``i`` has a gradient of norm ≥ C on coordinate ``i`` only, so at q = 1 its score (movement of that
    coordinate in units of lr·C/B) is N(T, Tσ²) when included and N(0, Tσ²) when not. Returns the one-run ε
    lower bound (guessing on the top/bottom ``k`` scores; default m/10 each) and μ̂ with its standard error,
    which must match √T/σ for a correct trainer.
    """
    import torch
    from monai.data import DataLoader, Dataset

    from monai_dp.audit.canary import _LinearLoss, estimate_mu
    from monai_dp.engines import DPSupervisedTrainer

    if not m >= 10:
        raise ValueError(error_message("m", "an int >= 10", m))
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    dim = m + 1
    records = [{"image": torch.eye(dim)[0], "label": torch.tensor([1.0])} for _ in range(others)]
    records += [{"image": torch.eye(dim)[1 + i] * 10 * max_grad_norm, "label": torch.tensor([1.0])}
                for i in np.flatnonzero(included)]
    net = torch.nn.Linear(dim, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    units = len(records)
    trainer = DPSupervisedTrainer(
        device="cpu", max_epochs=steps, train_data_loader=DataLoader(Dataset(records), batch_size=units),
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), loss_function=_LinearLoss(),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, noise_seed=seed, sampling_seed=seed,
        target_delta=1e-3 / units, make_compatible=False)
    trainer.logger.setLevel("WARNING")
    if mutate is not None:
        mutate(trainer)
    trainer.run()
    scores = net.weight.detach()[0, 1:].double().numpy() * units / max_grad_norm
    k = max(1, m // 10)
    result = one_run_epsilon(scores, included, k if k_pos is None else k_pos, k if k_neg is None else k_neg,
                             delta, confidence)
    mu, se = estimate_mu(scores[included], scores[~included])
    return {**result, "mu_hat": mu, "mu_se": se, "mu_claimed": math.sqrt(steps) / noise_multiplier,
            "scores": scores, "included": included}
