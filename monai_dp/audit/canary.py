"""Self-audit of the DP trainer: white-box Dirac canaries through the real training path.

With full-batch steps (q = 1) and a canary whose gradient is a Dirac of norm ≥ C on a coordinate no other
record touches, the canary's total effect on that coordinate after T steps is N(T, T σ²) (in units of
lr·C/B) when it is in the data and N(0, T σ²) when it is not: the mechanism is exactly μ-GDP with
μ = √T / σ. :func:`dirac_canary_scores` trains ``n`` models with and ``n`` without the canary through
``DPSupervisedTrainer`` (Poisson loader, per-sample gradients, Opacus clipping and noise); μ̂ estimated from
the scores must match √T / σ: a halved σ or a wrong normalisation moves it by many standard errors.
:func:`empirical_epsilon` turns in/out scores into a Clopper–Pearson lower bound on ε (capped near log n).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from monai_dp.utils.validation import error_message

__all__ = ["dirac_canary_scores", "empirical_epsilon", "estimate_mu"]


def _trainer(canary_records: int, others: int, steps: int, sigma: float, clip: float, unit: str, seed: int,
             mutate=None):
    import torch
    from monai.data import DataLoader, Dataset

    from monai_dp.engines import DPSupervisedTrainer

    records = [{"image": torch.tensor([1.0, 0.0]), "label": torch.tensor([1.0]), "patient_id": f"p{i}"}
               for i in range(others)]
    records += [{"image": torch.tensor([0.0, 10.0 * clip]), "label": torch.tensor([1.0]), "patient_id": "canary"}
                for _ in range(canary_records)]
    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    units = others + (1 if unit == "patient" and canary_records else canary_records)
    trainer = DPSupervisedTrainer(
        device="cpu", max_epochs=steps, train_data_loader=DataLoader(Dataset(records), batch_size=units),
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), loss_function=_LinearLoss(),
        noise_multiplier=sigma, max_grad_norm=clip, noise_seed=seed, sampling_seed=seed, privacy_unit=unit,
        target_delta=1e-3 / units, make_compatible=False)
    trainer.logger.setLevel("WARNING")
    if mutate is not None:
        mutate(trainer)
    return trainer, units


class _LinearLoss:
    """loss = −out·y: the per-example gradient of the weight is −y xᵀ, a Dirac for the canary's input."""

    def __call__(self, out, y):
        return -(out * y).mean()


def dirac_canary_scores(n: int, steps: int = 4, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                        canary_records: int = 1, unit: str = "record", others: int = 7, mutate=None,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of ``n`` runs with the canary and ``n`` without, in units of the clip norm (out: N(0, Tσ²)).

    ``canary_records`` aligned canary records belong to one patient; ``mutate(trainer)`` may change the trainer
    after construction (to test that the audit catches a bug).
    """
    if not n >= 2:
        raise ValueError(error_message("n", "an int >= 2", n))
    out = {True: [], False: []}
    for present in (True, False):
        for t in range(n):
            trainer, units = _trainer(canary_records if present else 0, others, steps, noise_multiplier,
                                      max_grad_norm, unit, seed * 1_000_003 + 2 * t + present, mutate)
            trainer.run()
            w = float(trainer.network.weight.detach()[0, 1])
            out[present].append(w * units / max_grad_norm)  # SGD lr 1: Δw = (C·shift + noise) / B
    return np.asarray(out[True]), np.asarray(out[False])


def estimate_mu(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[float, float]:
    """μ̂ = (mean_in − mean_out) / pooled sd, and its standard error √(2/n + μ̂²/(4n)) for n runs per side.

    Scores without spread (a run without noise: every score is the same) give μ̂ = ±∞ (0 if the means agree) with
    an infinite standard error: the two sides are told apart perfectly, which is no Gaussian mechanism.
    """
    a, b = np.asarray(scores_in, float), np.asarray(scores_out, float)
    if not (len(a) >= 2 and len(b) >= 2):
        raise ValueError(error_message("scores_in and scores_out", "at least 2 scores each", (len(a), len(b))))
    sd = math.sqrt((float(a.var(ddof=1)) + float(b.var(ddof=1))) / 2)
    diff = float(a.mean() - b.mean())
    n = min(len(a), len(b))
    if sd == 0:
        return (0.0 if diff == 0 else math.copysign(math.inf, diff)), math.inf
    mu = diff / sd
    return mu, math.sqrt(2 / n + mu**2 / (4 * n))


def empirical_epsilon(scores_in: np.ndarray, scores_out: np.ndarray, delta: float = 0.0,
                      confidence: float = 0.95) -> float:
    """Lower bound on ε at ``confidence`` from threshold tests (Clopper–Pearson on FPR and FNR).

    For every threshold, ε ≥ log((1 − δ − FNR⁺) / FPR⁺) with FPR⁺, FNR⁺ the one-sided upper confidence limits
    (confidence split over the two rates). With n runs per side the bound cannot exceed about log n.
    """
    a, b = np.sort(np.asarray(scores_in, float)), np.sort(np.asarray(scores_out, float))
    n1, n0 = len(a), len(b)
    alpha = (1 - confidence) / 2
    best = 0.0
    for thr in np.concatenate([a, b]):
        fp = int(n0 - np.searchsorted(b, thr, side="left"))  # out runs scored >= threshold
        fn = int(np.searchsorted(a, thr, side="left"))  # in runs scored below it
        fpr_hi = 1.0 if fp == n0 else stats.beta.ppf(1 - alpha, fp + 1, n0 - fp)
        fnr_hi = 1.0 if fn == n1 else stats.beta.ppf(1 - alpha, fn + 1, n1 - fn)
        num = 1 - delta - fnr_hi
        if num > 0 and fpr_hi > 0:
            best = max(best, math.log(num / fpr_hi))
    return best
