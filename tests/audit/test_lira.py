"""LiRA orchestration: balanced membership, resume, parallel workers, and a memorised patient found."""

from __future__ import annotations

import numpy as np
import pytest

from monai_dp.audit.lira import membership_matrix, run_lira
from monai_dp.audit.mia import lira_record_stats, patient_max
from monai_dp.audit.recipes import ArrayClassifierRecipe


def _data(n_patients=40, seed=0):
    """Two easy classes; patient P000 has 3 records with flipped labels (an outlier the model can memorise)."""
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"P{i:03d}" for i in range(n_patients)], 3)
    labels = np.tile([0, 1, 0], n_patients)
    images = rng.normal(0, 1, (len(pid), 1, 8, 8)).astype(np.float32) + labels[:, None, None, None] * 1.5
    labels[:3] = 1 - labels[:3]
    return images, labels, pid


def test_membership_is_balanced_per_patient():
    pid = np.repeat(["a", "b", "c", "d", "e"], [1, 2, 3, 1, 1])
    m = membership_matrix(pid, 8, seed=1)
    assert m.shape == (8, 8)
    assert (m.sum(0) == 4).all(), "every record in exactly half the models"
    assert (m[:, 1] == m[:, 2]).all() and (m[:, 3] == m[:, 5]).all(), "a patient's records go together"
    with pytest.raises(ValueError, match=r"`num_models` must be an even number >= 4, got 5"):
        membership_matrix(pid, 5)


def test_audit_finds_the_memorised_patient_and_resumes(tmp_path):
    images, labels, pid = _data()
    recipe = ArrayClassifierRecipe(images, labels, pid, epochs=30, batch_size=32, learning_rate=0.3, dp=False,
                                   width=8)
    calls = []
    res = run_lira(recipe, labels, pid, tmp_path, num_models=8, progress=lambda d, n, t: calls.append(d))
    assert calls == list(range(1, 9))
    stats = lira_record_stats(res["scores"], res["member"])
    pat = patient_max(stats["auc"], pid)
    top = pat["patient_id"][np.argmax(pat["auc"])]
    assert top == "P000", "the outlier patient is the most exposed"
    assert pat["auc"].max() > 0.9 and np.median(pat["auc"]) < 0.8
    # resume: only missing models are trained again
    (tmp_path / "model_0003.npz").unlink()
    calls.clear()
    again = run_lira(recipe, labels, pid, tmp_path, num_models=8, progress=lambda d, n, t: calls.append(d))
    assert calls == [8]
    np.testing.assert_array_equal(again["member"], res["member"])
    with pytest.raises(ValueError, match=r"`out_dir` must be a folder of the same audit"):
        run_lira(recipe, labels, pid, tmp_path, num_models=8, seed=5)


@pytest.mark.slow
def test_parallel_workers_give_the_same_models(tmp_path):
    images, labels, pid = _data(n_patients=10)
    recipe = ArrayClassifierRecipe(images, labels, pid, epochs=2, batch_size=8, dp=True, width=4,
                                   dp_kwargs={"noise_multiplier": 1.0, "max_grad_norm": 1.0}, device="cpu")
    a = run_lira(recipe, labels, pid, tmp_path / "a", num_models=4, workers=2)
    assert a["scores"].shape == (4, 30) and np.isfinite(a["scores"]).all()
    assert sorted(p.name for p in (tmp_path / "a").glob("model_*.npz")) == [f"model_{i:04d}.npz" for i in range(4)]
    # the same audit in one process: the same membership; without DP noise, the same models and so the same scores
    one = run_lira(recipe, labels, pid, tmp_path / "b", num_models=4, workers=1)
    np.testing.assert_array_equal(one["member"], a["member"])
    plain = ArrayClassifierRecipe(images, labels, pid, epochs=2, batch_size=8, dp=False, width=4, device="cpu")
    two_workers = run_lira(plain, labels, pid, tmp_path / "c", num_models=4, workers=2)
    one_worker = run_lira(plain, labels, pid, tmp_path / "d", num_models=4, workers=1)
    np.testing.assert_allclose(two_workers["scores"], one_worker["scores"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(two_workers["scores"][0], two_workers["scores"][1]), "the models differ from each other"
