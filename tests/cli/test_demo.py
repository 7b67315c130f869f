"""``monai-dp demo`` / ``python -m monai_dp demo``: synthetic data, flags, and a tiny real run."""

from __future__ import annotations

import math

import pytest
import torch

from monai_dp.cli import demo, main


def test_synthetic_images_hold_a_brighter_disc_in_the_positive_class():
    records = demo.make_synthetic_images(40, size=16, seed=3)
    assert [int(r["label"]) for r in records] == [i % 2 for i in range(40)]
    assert all(r["image"].shape == (1, 16, 16) and r["image"].dtype == torch.float32 for r in records)
    mean = {c: torch.stack([r["image"].mean() for r in records if int(r["label"]) == c]).mean() for c in (0, 1)}
    assert mean[1] > mean[0] + 0.05
    again = demo.make_synthetic_images(40, size=16, seed=3)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(records, again))


def test_flags_reach_the_run_and_the_summary_says_why_it_stopped(monkeypatch, capsys):
    calls = []

    def run_demo(*args):
        calls.append(args)
        return {"epsilon": 2.5, "delta": 1e-5, "steps": 12, "val_accuracy": 0.75, "stopped_by_budget": True,
                "seconds": 3.0}

    monkeypatch.setattr(demo, "run_demo", run_demo)
    assert main(["demo", "--target-epsilon", "2.5", "--noise-multiplier", "0.8", "--max-epochs", "3", "--n-train",
                 "100", "--batch-size", "10", "--accountant", "rdp", "--seed", "4"]) == 0
    assert calls == [(2.5, 0.8, 3, 100, 10, "rdp", 4)]
    out = capsys.readouterr().out
    assert "12 DP-SGD steps, ε = 2.500 (budget 2.5" in out and "stopped because the privacy budget was reached" in out


@pytest.mark.slow
def test_a_tiny_demo_run_accounts_its_steps():
    from monai_dp.privacy import create_accountant

    res = demo.run_demo(target_epsilon=50.0, noise_multiplier=1.0, max_epochs=1, n_train=64, batch_size=32,
                        accountant="rdp", device="cpu")
    assert res["steps"] > 0 and not res["stopped_by_budget"] and res["delta"] == 1e-5
    accountant = create_accountant("rdp")
    accountant.step(1.0, 32 / 64, res["steps"])  # sigma as given, q = batch / records
    assert res["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert math.isfinite(res["val_accuracy"])  # the validation handler ran
