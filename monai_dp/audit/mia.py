"""Membership-inference statistics, vectorised over records and models.

Patient-level LiRA (after Knolle et al., Nature 2025): M models are trained on random halves of the patients;
every record x gets a logit-scaled confidence s = log p_y − log Σ_{y'≠y} p_{y'} under every model. For each
record, Gaussians are fitted to s over the models that trained on it ("in") and those that did not ("out");
its membership AUC is the bi-normal AUC Φ((μ_in − μ_out) / √(σ_in² + σ_out²)), floored at 0.5, with the
Hanley–McNeil (1982) standard error. A patient's score is the maximum over their records, which is biased
upward even without leakage: :func:`null_max_auc` calibrates it.

RMIA (Zarifzadeh et al., ICML 2024), offline: audits one trained model with black-box access and a few
reference models that did not train on the records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from monai_dp.utils.validation import error_message

__all__ = [
    "above_bound_test",
    "binormal_auc",
    "hanley_mcneil_se",
    "lira_record_stats",
    "logit_confidence",
    "null_max_auc",
    "patient_max",
    "rmia_scores",
    "roc",
    "tail_composition",
]


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """s = log p_y − log Σ_{y'≠y} p_{y'} from logits ``(..., C)`` and integer labels ``(...)`` (numerically stable).

    A single logit (binary, sigmoid) gives s = ±logit.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if logits.shape[-1] == 1:
        z = logits[..., 0]
        return np.where(labels == 1, z, -z)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(error_message("labels", f"of shape {logits.shape[:-1]} (logits without the class axis)",
                                       labels.shape))
    correct = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    others = logits.copy()
    np.put_along_axis(others, labels[..., None], -np.inf, axis=-1)
    m = others.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(others - m).sum(axis=-1))
    return correct - lse


def binormal_auc(mu_in, sd_in, mu_out, sd_out, floor: bool = True) -> np.ndarray:
    """Φ((μ_in − μ_out) / √(σ_in² + σ_out²)), floored at 0.5 by default."""
    scale = np.sqrt(np.asarray(sd_in) ** 2 + np.asarray(sd_out) ** 2)
    auc = stats.norm.cdf((np.asarray(mu_in) - np.asarray(mu_out)) / np.maximum(scale, 1e-12))
    return np.maximum(auc, 0.5) if floor else auc


def hanley_mcneil_se(auc, n_in, n_out) -> np.ndarray:
    """Standard error of an AUC from ``n_in`` positives and ``n_out`` negatives (Hanley & McNeil 1982)."""
    a = np.asarray(auc, dtype=np.float64)
    n1, n2 = np.asarray(n_in, dtype=np.float64), np.asarray(n_out, dtype=np.float64)
    q1, q2 = a / (2 - a), 2 * a**2 / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a**2) + (n2 - 1) * (q2 - a**2)) / np.maximum(n1 * n2, 1)
    return np.sqrt(np.maximum(var, 0.0))


def lira_record_stats(scores: np.ndarray, member: np.ndarray) -> dict[str, np.ndarray]:
    """Per-record Gaussian fits and bi-normal AUC from ``scores`` and ``member`` of shape (models, records)."""
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(member, dtype=bool)
    if s.shape != m.shape or s.ndim != 2:
        raise ValueError(error_message("scores, member", "2-D arrays (models, records) of the same shape",
                                       (s.shape, m.shape)))
    n_in, n_out = m.sum(0), (~m).sum(0)
    if np.any(n_in < 2) or np.any(n_out < 2):
        bad = int(np.argmax((n_in < 2) | (n_out < 2)))
        raise ValueError(error_message(f"record {bad}", "in and out of at least 2 models each",
                                       f"in {int(n_in[bad])}, out {int(n_out[bad])}", "Train more models."))

    def fit(mask, n):
        mu = np.where(mask, s, 0.0).sum(0) / n
        var = np.where(mask, (s - mu) ** 2, 0.0).sum(0) / (n - 1)
        return mu, np.sqrt(var)

    mu_in, sd_in = fit(m, n_in)
    mu_out, sd_out = fit(~m, n_out)
    auc = binormal_auc(mu_in, sd_in, mu_out, sd_out)
    return {"mu_in": mu_in, "sd_in": sd_in, "mu_out": mu_out, "sd_out": sd_out, "n_in": n_in, "n_out": n_out,
            "auc": auc, "auc_se": hanley_mcneil_se(auc, n_in, n_out)}


def patient_max(record_auc: np.ndarray, patient_ids: Sequence, record_se: np.ndarray | None = None) -> dict:
    """Per-patient maximum record AUC (and that record's SE), each patient's record count, and
    ``record_patient``: the index (into ``patient_id``) of every record's patient."""
    ids = np.asarray([str(p) for p in patient_ids])
    uniq, inverse = np.unique(ids, return_inverse=True)
    order = np.lexsort((-np.asarray(record_auc), inverse))  # by patient, then AUC descending
    first = np.ones(len(order), dtype=bool)
    first[1:] = inverse[order][1:] != inverse[order][:-1]
    top = order[first]
    out = {"patient_id": uniq, "auc": np.asarray(record_auc)[top], "num_records": np.bincount(inverse),
           "record_index": top, "record_patient": inverse}
    if record_se is not None:
        out["auc_se"] = np.asarray(record_se)[top]
    return out


def above_bound_test(auc, se, bound: float, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """One-sided p-values of "AUC > ``bound``" and which of them Holm's procedure rejects at family-wise ``alpha``.

    With hundreds of records, some estimates land a standard error or more above the bound by chance even when
    the guarantee holds; Holm's step-down correction keeps the chance of flagging any record wrongly at or
    below ``alpha`` (given approximately normal estimates with the stated SE).
    """
    if not 0 < alpha < 1:
        raise ValueError(error_message("alpha", "a family-wise error rate in (0, 1)", alpha))
    z = (np.asarray(auc, dtype=np.float64) - bound) / np.maximum(np.asarray(se, dtype=np.float64), 1e-12)
    p = stats.norm.sf(z)
    flat = p.reshape(-1)
    order = np.argsort(flat, kind="stable")
    m = len(flat)
    passed = flat[order] <= alpha / (m - np.arange(m))
    k = m if passed.all() else int(np.argmin(passed))  # Holm stops at the first non-rejection
    reject = np.zeros(m, dtype=bool)
    reject[order[:k]] = True
    return p, reject.reshape(p.shape)


def null_max_auc(k: int, n_in: int, n_out: int, num_sim: int = 2000, seed: int = 0) -> float:
    """Mean of the maximum bi-normal AUC over ``k`` records when nothing leaks (in and out both N(0, 1))."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((num_sim, k, n_in))
    b = rng.standard_normal((num_sim, k, n_out))
    auc = binormal_auc(a.mean(-1), a.std(-1, ddof=1), b.mean(-1), b.std(-1, ddof=1))
    return float(auc.max(axis=1).mean())


def roc(scores: np.ndarray, labels: np.ndarray, fprs: Sequence[float] = (0.001, 0.01)) -> dict:
    """ROC curve, AUC (rank-based, ties averaged) and TPR at the given FPRs (higher score = member)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(error_message("scores, labels", "1-D arrays of the same length", (s.shape, y.shape)))
    n1, n0 = int(y.sum()), int((~y).sum())
    if not (n1 and n0):
        raise ValueError(error_message("labels", "both members and non-members", f"{n1} members, {n0} non-members"))
    ranks = stats.rankdata(s)
    auc = (ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    order = np.argsort(-s, kind="stable")
    tpr = np.concatenate([[0.0], np.cumsum(y[order]) / n1])
    fpr = np.concatenate([[0.0], np.cumsum(~y[order]) / n0])
    at = {float(f): float(tpr[np.searchsorted(fpr, f, side="right") - 1]) for f in fprs}
    return {"fpr": fpr, "tpr": tpr, "auc": float(auc), "tpr_at_fpr": at}


def rmia_scores(p_target_x: np.ndarray, p_ref_x: np.ndarray, p_target_z: np.ndarray, p_ref_z: np.ndarray,
                a: float = 0.3, gamma: float = 1.0) -> np.ndarray:
    """Offline RMIA scores of records x against population samples z.

    ``p_*`` are the probabilities of the true label: under the target model (``(n,)``) and under reference
    models that did not train on the records (``(R, n)``). Offline, Pr(x) is approximated from the out
    references as ½((1 + a) mean_out + (1 − a)). The score of x is the fraction of z whose likelihood ratio it
    beats by more than ``gamma``.
    """
    def ratio(p_t, p_r):
        p_r = np.atleast_2d(np.asarray(p_r, dtype=np.float64))
        prior = 0.5 * ((1 + a) * p_r.mean(0) + (1 - a))
        return np.asarray(p_t, dtype=np.float64) / np.maximum(prior, 1e-30)

    rx, rz = ratio(p_target_x, p_ref_x), np.sort(ratio(p_target_z, p_ref_z))
    return np.searchsorted(rz, rx / gamma, side="left") / len(rz)


def tail_composition(record_auc: np.ndarray, columns: Mapping[str, Sequence], percentile: float = 99.0) -> dict:
    """Composition of the most vulnerable records (AUC above ``percentile``) against the whole data set.

    For each metadata column: observed and expected counts per group in the tail, Pearson residuals
    (O − E) / √E, and the chi-square goodness-of-fit p-value.
    """
    auc = np.asarray(record_auc, dtype=np.float64)
    tail = auc >= np.percentile(auc, percentile)
    out = {"percentile": percentile, "tail_size": int(tail.sum()), "columns": {}}
    for name, values in columns.items():
        v = np.asarray([str(x) for x in values])
        if v.shape != auc.shape:
            raise ValueError(error_message(f"columns[{name!r}]", f"one value per record ({auc.size})", v.size))
        groups, counts = np.unique(v, return_counts=True)
        expected = counts / counts.sum() * tail.sum()
        observed = np.array([int((v[tail] == g).sum()) for g in groups])
        resid = (observed - expected) / np.sqrt(np.maximum(expected, 1e-12))
        chi2 = float(((observed - expected) ** 2 / np.maximum(expected, 1e-12)).sum())
        p = float(stats.chi2.sf(chi2, df=max(len(groups) - 1, 1)))
        out["columns"][name] = {"groups": groups.tolist(), "observed": observed.tolist(),
                                "expected": expected.tolist(), "pearson_residual": resid.tolist(),
                                "chi2": chi2, "p_value": p}
    return out
