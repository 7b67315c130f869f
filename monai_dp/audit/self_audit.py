"""``monai-dp audit --self-audit``: does this installation's DP trainer add the noise and clip as it claims?

Runs the white-box Dirac-canary audits of :mod:`monai_dp.audit.canary` and :mod:`monai_dp.audit.one_run`
through the real ``DPSupervisedTrainer`` (Poisson loader, clipping, Opacus noise) and checks the two
things a correct DP-SGD must satisfy: μ̂ matches √T/σ within 4 standard errors, and no empirical ε
lower bound exceeds the accountant's ε. Writes ``self_audit.json`` and ``self_audit.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["run_self_audit"]


def run_self_audit(out: str | Path, runs: int = 64, steps: int = 4, noise_multiplier: float = 1.0,
                   canaries: int = 1000, delta: float = 1e-5, seed: int = 0) -> dict:
    """Run both canary audits; return (and write) the measured values and whether each check passed."""
    from monai_dp.audit.canary import (
        dirac_canary_scores,
        empirical_epsilon,
        estimate_mu,
    )
    from monai_dp.audit.one_run import dirac_one_run_audit
    from monai_dp.privacy import create_accountant

    acc = create_accountant("prv")
    acc.step(noise_multiplier, 1.0, steps)
    claimed = float(acc.get_epsilon(delta))
    mu_claimed = math.sqrt(steps) / noise_multiplier
    a, b = dirac_canary_scores(runs, steps=steps, noise_multiplier=noise_multiplier, seed=seed)
    mu, se = estimate_mu(a, b)
    eps_runs = empirical_epsilon(a, b, delta=delta)
    one = dirac_one_run_audit(m=canaries, steps=steps, noise_multiplier=noise_multiplier, delta=delta, seed=seed)
    checks = {
        "mu_matches (|μ̂ − √T/σ| < 4 SE, n runs each side)": abs(mu - mu_claimed) < 4 * se,
        "mu_matches (one run, m canaries)": abs(one["mu_hat"] - mu_claimed) < 4 * one["mu_se"],
        "epsilon_not_exceeded (n runs, Clopper-Pearson)": eps_runs <= claimed,
        "epsilon_not_exceeded (one run)": one["epsilon_lower"] <= claimed,
    }
    result = {"steps": steps, "noise_multiplier": noise_multiplier, "delta": delta, "claimed_epsilon": claimed,
              "mu_claimed": mu_claimed, "runs_per_side": runs, "mu_hat": mu, "mu_se": se,
              "empirical_epsilon_runs": eps_runs, "one_run": {k: v for k, v in one.items()
                                                              if k not in ("scores", "included")},
              "checks": checks, "passed": all(checks.values())}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "self_audit.json").write_text(json.dumps(result, indent=2))
    lines = ["# DP trainer self-audit", "",
             f"White-box Dirac canaries through `DPSupervisedTrainer`, T = {steps} full-batch steps, σ = "
             f"{noise_multiplier}: the mechanism is μ-GDP with μ = √T/σ = {mu_claimed:.3f}; the accountant (PRV) "
             f"claims ε = {claimed:.3f} at δ = {delta:g}.", "",
             "| check | measured | expected | result |", "|---|---|---|---|",
             f"| μ̂, {runs} runs with and {runs} without the canary | {mu:.3f} ± {se:.3f} | {mu_claimed:.3f} | "
             f"{'pass' if checks['mu_matches (|μ̂ − √T/σ| < 4 SE, n runs each side)'] else 'FAIL'} |",
             f"| μ̂, one run with {canaries} canaries | {one['mu_hat']:.3f} ± {one['mu_se']:.3f} | {mu_claimed:.3f} | "
             f"{'pass' if checks['mu_matches (one run, m canaries)'] else 'FAIL'} |",
             f"| empirical ε (Clopper–Pearson, 95 %) | {eps_runs:.3f} | ≤ {claimed:.3f} | "
             f"{'pass' if checks['epsilon_not_exceeded (n runs, Clopper-Pearson)'] else 'FAIL'} |",
             f"| one-run ε (Steinke et al. 2023, 95 %; {one['correct']}/{one['guesses']} guesses right) | "
             f"{one['epsilon_lower']:.3f} | ≤ {claimed:.3f} | "
             f"{'pass' if checks['epsilon_not_exceeded (one run)'] else 'FAIL'} |", "",
             "All checks passed." if result["passed"] else
             "**A check failed: the trainer does not do what the accountant assumes. Do not rely on its ε.**"]
    (out / "self_audit.md").write_text("\n".join(lines) + "\n")
    return result
