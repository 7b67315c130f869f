"""Accountant comparison and the patient-level cost of record-level training, as markdown tables.

    python benchmarks/accounting_table.py

Prints (1) ε at δ = 1e-5 from each accountant for a few DP-SGD settings, with RDP's and GDP's gap to PLD,
and (2) for a record-level run, the ε a patient with k records gets: tight (PLD of the Poisson-subsampled
mixture of Gaussians) against the textbook group-privacy conversion. It measures; it asserts nothing.
"""

from __future__ import annotations

import time

from monai_dp.privacy import create_accountant, group_privacy_epsilon, patient_level_epsilon

DELTA = 1e-5
SETTINGS = [(0.01, 1.0, 10_000), (256 / 60000, 1.1, 14_063), (0.01, 4.0, 40_000), (0.032, 1.0, 1563),
            (2048 / 59000, 1.8, 1120)]


def accountant_table() -> list[str]:
    lines = ["| q | σ | steps | PLD | PRV | RDP | GDP (approximation) | RDP / PLD | GDP / PLD |", "|---|---|---|---|---|---|---|---|---|"]
    for q, sigma, steps in SETTINGS:
        eps = {}
        for name in ("pld", "prv", "rdp", "gdp"):
            acc = create_accountant(name)
            acc.step(sigma, q, steps)
            eps[name] = acc.get_epsilon(DELTA)
        lines.append(f"| {q:.4g} | {sigma:g} | {steps} | {eps['pld']:.3f} | {eps['prv']:.3f} | {eps['rdp']:.3f} | "
                     f"{eps['gdp']:.3f} | {eps['rdp'] / eps['pld']:.3f} | {eps['gdp'] / eps['pld']:.3f} |")
    return lines


def patient_table(q: float = 0.032, sigma: float = 1.0, steps: int = 1563) -> list[str]:
    lines = [f"Record-level run q = {q}, σ = {sigma}, T = {steps}, δ = {DELTA}:", "",
             "| records per patient k | ε tight (mixture PLD) | ε group-privacy formula |", "|---|---|---|"]
    for k in (1, 2, 4, 8, 16):
        tight = patient_level_epsilon(sigma, q, steps, k, DELTA)
        loose = group_privacy_epsilon(sigma, q, steps, k, DELTA)
        lines.append(f"| {k} | {tight:.3g} | {loose:.3g} |")
    return lines


def main() -> None:
    start = time.time()
    print("\n".join(accountant_table()))
    print()
    print("\n".join(patient_table()))
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
