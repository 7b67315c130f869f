"""benchmarks/fashion_mnist.py runs its no-DP row: the bundle's configs under MONAI's SupervisedTrainer.

The no-DP row had stopped working when the best checkpoint gained the privacy history (which refuses a trainer
without DP); the benchmark now strips the configs as benchmarks/bundle_defaults.py does. Tiny synthetic idx-like
data (a class-dependent bright row), so the run takes seconds and has something to learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

BENCHMARK = "fashion_mnist"


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module


def _npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 120), ("val", 40), ("test", 40)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c, :] = 255
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    path = tmp_path / "fashion.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("recipe", ["linear", "projected"])
def test_no_dp_row_trains_with_supervised_trainer_and_evaluates(bench, tmp_path, recipe):
    over = {"projection_components": 100, "max_epochs": 10, "batch_size": 20, "learning_rate": 0.1, "val_batch_size": 40,
            "feature_cache_dir": str(tmp_path / "cache"), "ema_start_step": 0, "ema_decay": 0.5}
    res = bench.run_recipe("non_dp", tmp_path, _npz(tmp_path), False, over, recipe)
    assert res["dp"] is False and res["sigma"] is None and res["epsilon"] == float("inf")
    assert res["steps"] == 10 * 6  # SupervisedTrainer: 120 records in batches of 20, no Poisson sampling
    assert res["test_accuracy"] > 0.5  # ten classes: it learned (chance is 0.1)
    saved = tmp_path / "non_dp" / "models" / "model.pt"
    assert saved.exists()
    import torch

    state = torch.load(saved, weights_only=True)
    state = state.get("model", state)  # without DP the checkpoint holds the network alone
    head = "linear.weight" if recipe == "projected" else "net.2.weight"
    assert state[head].shape == (10, 100 if recipe == "projected" else 81 * 49)
