"""Tiny CPU settings of the 2D classification bundle for federated tests: small data, a small DenseNet."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "dp_classification_2d"
ITEMS, BATCH = 40, 8  # with the bundle's val_fraction 0.2 and test_fraction 0.1: 28 training records
NETWORK = {"_target_": "DenseNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "init_features": 8,
           "growth_rate": 8, "block_config": [1, 1], "bn_size": 2, "norm": ["group", {"num_groups": 4}]}


def site_overrides(data_dir: Path, seed: int) -> dict:
    """Bundle overrides of one site: its own synthetic data, the tiny network, only the privacy logging handler."""
    return {"synthetic_items": ITEMS, "synthetic_size": 32, "image_size": [32, 32], "batch_size": BATCH,
            "seed": seed, "synthetic_dir": str(data_dir), "network_def#network": NETWORK,
            "train#handlers": [{"_target_": "StatsHandler", "iteration_log": False,
                                "state_attributes": "@dp_log_attributes"}]}


def training_records(data_dir: Path, seed: int) -> list:
    """The site's training split, read the way the bundle reads it."""
    from monai_dp.data import load_datalist

    return load_datalist(str(data_dir), "classification", 2, 2, val_fraction=0.2, test_fraction=0.1, seed=seed,
                         patient_key="patient_id")["training"]


def pld_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps by Google's dp-accounting PLD (independent of monai_dp)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier)), steps)
    return acc.get_epsilon(delta)
