"""What accounting costs next to a training step, as a markdown table.

    python benchmarks/accounting_cost.py

(1) Time of one ε query after one more step (history (σ, q, T + 1)), as a trainer publishing ε every step
would pay it: Opacus' own PRV and RDP accountants against monai_dp's (the same numbers, with RDP vectors
cached per (σ, q)), and the PLD accountant. (2) Seconds per step of a small DP training run with ε published
every iteration against the default (epoch ends only). It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

DELTA = 1e-5
SETTINGS = [(64 / 450, 1.0, 100), (256 / 60000, 1.1, 2000), (0.01, 1.0, 10_000)]


def _time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def query_table() -> list[str]:
    import warnings

    from opacus.accountants import PRVAccountant as OpacusPRV
    from opacus.accountants import RDPAccountant as OpacusRDP

    from monai_dp.privacy import create_accountant
    from monai_dp.privacy.accountants import RDP_EXTRA_ORDERS

    warnings.simplefilter("ignore", UserWarning)
    lines = ["| q | σ | T | Opacus PRV | monai_dp PRV | Opacus RDP | monai_dp RDP | monai_dp PLD |",
             "|---|---|---|---|---|---|---|---|"]
    for q, sigma, steps in SETTINGS:
        cells = []
        for name in ("opacus-prv", "prv", "opacus-rdp", "rdp", "pld"):
            t = [steps]

            def query(name=name, t=t, sigma=sigma, q=q):
                t[0] += 1  # a new history each time, as after every step: no result cache helps
                if name == "opacus-prv":
                    acc = OpacusPRV()
                    acc.history = [(sigma, q, t[0])]
                    return acc.get_epsilon(DELTA, eps_error=0.01, delta_error=DELTA / 1000)
                if name == "opacus-rdp":
                    acc = OpacusRDP()
                    acc.history = [(sigma, q, t[0])]
                    return acc.get_epsilon(DELTA, alphas=list(OpacusRDP.DEFAULT_ALPHAS) + list(RDP_EXTRA_ORDERS))
                acc = create_accountant(name)
                acc.step(sigma, q, t[0])
                return acc.get_epsilon(DELTA)

            query()  # warm-up: imports, and monai_dp's per-(σ, q) RDP vectors
            cells.append(f"{_time(query):.3f} s")
        lines.append(f"| {q:.4g} | {sigma:g} | {steps} | " + " | ".join(cells) + " |")
    return lines


def training_table(steps: int = 60) -> list[str]:
    import torch
    from torch import nn

    from monai_dp.engines import DPSupervisedTrainer
    from monai_dp.handlers import PrivacyMetricsHandler

    torch.manual_seed(0)
    data = [{"image": torch.randn(1, 28, 28), "label": torch.tensor(i % 2)} for i in range(steps * 16)]
    lines = ["| ε published | s/step | accountant |", "|---|---|---|"]
    for accountant in ("prv", "pld"):
        for label, interval in (("every iteration", 1), ("at epoch ends (default)", None)):
            net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Tanh(), nn.AdaptiveAvgPool2d(4),
                                nn.Flatten(), nn.Linear(128, 2))
            trainer = DPSupervisedTrainer(
                device="cpu", max_epochs=1, train_data_loader=torch.utils.data.DataLoader(data, batch_size=16),
                network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=nn.CrossEntropyLoss(),
                noise_multiplier=1.0, max_grad_norm=1.0, accountant=accountant, target_delta=DELTA,
                train_handlers=[PrivacyMetricsHandler(iteration_interval=interval)])
            trainer.logger.setLevel("WARNING")
            start = time.perf_counter()
            trainer.run()
            lines.append(f"| {label} | {(time.perf_counter() - start) / trainer.dp_steps:.4f} | {accountant} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args()
    import opacus
    import torch

    head = (f"{platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
            f"opacus {opacus.__version__}; δ = {DELTA:g}; median of 3 queries")
    text = "\n".join([head, "", "One ε query after one more step:", "", *query_table(), "",
                      "Small DP training run (1×28×28 inputs, batch 16, a 1.2k-parameter CNN):", "", *training_table()])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
