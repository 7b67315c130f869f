"""The audit's training recipes train on exactly the records they are given, with the DP trainer as configured."""

from __future__ import annotations

import numpy as np
import pytest

from monai_dp.audit.recipes import ArrayClassifierRecipe


def _recipe(**kw):
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 2
    images = (rng.normal(size=(60, 1, 8, 8)) + labels[:, None, None, None]).astype(np.float32)
    kw.setdefault("dp_kwargs", {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_delta": 1e-3})
    return ArrayClassifierRecipe(images, labels, np.arange(60) // 2, epochs=2, batch_size=10, width=4, **kw)


def test_the_dp_recipe_samples_only_the_given_records_and_returns_their_accounting():
    recipe = _recipe()
    train = np.arange(0, 60, 2)  # 30 of the 60 records
    logits, history = recipe(train, seed=1)
    assert logits.shape == (60, 2) and np.isfinite(logits).all()  # scores for every record, members or not
    assert history == [(1.0, 10 / 30, 2 * 3)]  # q = batch / the 30 given records, int(1/q) steps per epoch


def test_the_non_dp_recipe_returns_logits_only():
    logits = _recipe(dp=False)(np.arange(40), seed=0)
    assert isinstance(logits, np.ndarray) and logits.shape == (60, 2)


def test_inconsistent_arrays_are_refused():
    with pytest.raises(ValueError, match=r"`images, labels, patient_ids` must be \(N, C, H, W\), \(N,\), \(N,\)"):
        ArrayClassifierRecipe(np.zeros((4, 8, 8)), np.zeros(4), np.zeros(4))
