"""ProjectedFeatureClassifier: its statistics against a numpy reference, the release's sensitivity and noise, and
how a DP trainer and the privacy ledger account the release (or refuse statistics they cannot account)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.handlers import PrivacyLedgerHandler
from monai_dp.networks import ProjectedFeatureClassifier, statistics_releases
from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.utils.errors import DPConfigurationError, PrivacyBudgetExhaustedError

SHAPE = (6, 3, 3)  # C = 6 channels, S = 9 positions


def _records(n: int = 300, seed: int = 0, shape=SHAPE) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(shape[0], shape[0], generator=g)  # correlated channels: distinct eigenvalues
    x = torch.einsum("pq,nq...->np...", mix, torch.randn(n, *shape, generator=g)) + torch.linspace(0, 2, shape[-1])
    y = (x[:, 0].flatten(1).mean(1) > x[:, 1].flatten(1).mean(1)).long()
    return [{"image": x[i], "label": y[i]} for i in range(n)]


def _group_norm_np(x: np.ndarray, groups: int, eps: float = 1e-5) -> np.ndarray:
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(n, c, -1)


def _reference_projection(train: np.ndarray, test: np.ndarray, groups: int, k: int, ridge: float) -> np.ndarray:
    """The head's projection from the exact statistics, written independently in numpy (float64)."""
    xt = _group_norm_np(train, groups)
    mean = xt.mean(0)
    centred = xt - mean
    n, c, s = centred.shape
    chan = np.einsum("nps,nqs->pq", centred, centred) / (n * s)
    pos = np.einsum("nci,ncj->ij", centred, centred) / (n * c)
    ev_c, v_c = np.linalg.eigh(chan)
    ev_p, v_p = np.linalg.eigh(pos)
    products = np.outer(ev_c, ev_p).ravel()
    top = np.argsort(-products)[:k]
    z = np.einsum("ca,ncs,sb->nab", v_c, _group_norm_np(test, groups) - mean, v_p).reshape(len(test), -1)[:, top]
    return z / np.sqrt(products[top] / (np.trace(chan) / c) + ridge)


def test_statistics_match_a_numpy_reference_when_the_noise_is_negligible():
    records = _records()
    head = ProjectedFeatureClassifier(SHAPE, 2, norm_groups=3, components=20, ridge=0.05)
    head.release_statistics(records, noise_multiplier=1e-9, noise_seed=0)
    test = torch.stack([r["image"] for r in _records(50, seed=1)])
    ours = head.project(test).double().numpy()
    train = torch.stack([r["image"] for r in records]).double().numpy()
    ref = _reference_projection(train, test.double().numpy(), 3, 20, 0.05)
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), rtol=1e-3, atol=1e-4)  # eigenvector signs are free
    assert head(test).shape == (50, 2)


def test_sensitivity_of_the_sums_is_bounded_by_sqrt3_r_squared():
    records = _records(40)
    head = ProjectedFeatureClassifier(SHAPE, 2, norm_groups=3, components=10)
    clip = 2.0  # below the records' norms (sqrt(54) after GroupNorm): every record is clipped
    outlier = {"image": 1e3 * torch.randn(SHAPE), "label": torch.tensor(0)}
    without = head.statistic_sums(records, clip)
    with_ = head.statistic_sums([*records, outlier], clip)
    total, chan, pos = (a - b for a, b in zip(with_, without))
    change = torch.cat([clip * total.flatten(), chan.triu().flatten(), pos.triu().flatten()]).norm()
    assert change <= head.sensitivity(clip) * (1 + 1e-9)
    assert change > 0.5 * head.sensitivity(clip)  # a worst-case record comes close: the bound is not slack
    assert head.sensitivity(clip) == pytest.approx(math.sqrt(3) * clip**2)


def test_released_mean_carries_noise_of_the_stated_standard_deviation():
    shape = (16, 8, 8)  # 1,024 mean coordinates: the spread is known to about 2 %
    records = _records(30, shape=shape)
    head = ProjectedFeatureClassifier(shape, 2, norm_groups=4, components=10)
    sigma, clip = 0.5, 3.0
    exact = head.statistic_sums(records, clip)[0] / len(records)
    head.release_statistics(records, noise_multiplier=sigma, clip_norm=clip, noise_seed=3)
    noise = (head.mean.double() - exact) * clip * len(records)
    assert noise.std().item() == pytest.approx(sigma * math.sqrt(3) * clip**2, rel=0.1)


def _trainer(network, records, **kw) -> DPSupervisedTrainer:
    return DPSupervisedTrainer(device="cpu", max_epochs=2, train_data_loader=DataLoader(Dataset(records), batch_size=50),
                               network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.5),
                               loss_function=torch.nn.CrossEntropyLoss(), target_epsilon=3.0, target_delta=1e-5,
                               max_grad_norm=1.0, noise_seed=0, sampling_seed=0, **kw)


def _released(records, sigma=4.0) -> ProjectedFeatureClassifier:
    head = ProjectedFeatureClassifier(SHAPE, 2, norm_groups=3, components=20)
    head.release_statistics(records, noise_multiplier=sigma, noise_seed=1)
    return head


def test_trainer_composes_the_release_and_calibrates_over_both():
    records = _records()
    plain = _trainer(ProjectedFeatureClassifier(SHAPE, 2, norm_groups=3, components=20), records)
    trainer = _trainer(_released(records), records)
    assert trainer.privacy.accountant.history[0] == (4.0, 1.0, 1)
    assert trainer.privacy.noise_multiplier > plain.privacy.noise_multiplier  # the release costs DP-SGD noise
    trainer.run()
    sigma, q, steps = trainer.privacy.accountant.history[-1]
    assert steps == trainer.privacy.planned_steps  # calibrated over both: no planned step is cut
    from monai_dp.privacy.accountants import create_accountant

    alone = create_accountant("prv")
    alone.step(sigma, q, steps)
    assert alone.get_epsilon(1e-5) < trainer.get_epsilon() <= 3.0


def test_the_ledger_is_charged_for_the_release_before_the_run(tmp_path):
    records = _records()
    path = str(tmp_path / "ledger.db")
    PrivacyLedger(path).init_dataset("d", epsilon=5.0, delta=1e-5)
    trainer = _trainer(_released(records), records, train_handlers=[PrivacyLedgerHandler(path, dataset_id="d")])
    trainer.run()
    spent = PrivacyLedger(path).spent("d")
    runs = [(r["noise_multiplier"], r["sample_rate"], r["steps_taken"], r["status"]) for r in spent.runs]
    assert runs[0] == (4.0, 1.0, 1, "finished")
    assert runs[1][2] == trainer.privacy.accountant.history[-1][2] and len(runs) == 2
    assert spent.epsilon == pytest.approx(trainer.get_epsilon(), abs=0.05)  # the ledger's PLD vs the trainer's PRV
    assert trainer.privacy.prior[0]["ledger_run"] == spent.runs[0]["run_id"]


def test_a_release_the_budget_cannot_hold_is_refused_by_the_ledger(tmp_path):
    records = _records()
    path = str(tmp_path / "ledger.db")
    PrivacyLedger(path).init_dataset("d", epsilon=0.5, delta=1e-5)
    trainer = _trainer(_released(records), records,  # the release alone spends about ε = 1.2
                       train_handlers=[PrivacyLedgerHandler(path, dataset_id="d")])
    with pytest.raises(PrivacyBudgetExhaustedError):
        trainer.run()
    assert PrivacyLedger(path).spent("d").runs == []


def test_statistics_without_their_release_or_edited_are_refused():
    records = _records()
    released = _released(records)
    loaded = ProjectedFeatureClassifier(SHAPE, 2, norm_groups=3, components=20)
    loaded.load_state_dict(released.state_dict())
    with pytest.raises(DPConfigurationError, match="no release record"):
        _trainer(loaded, records)
    with torch.no_grad():
        released.scale.mul_(2.0)
    with pytest.raises(DPConfigurationError, match="changed since"):
        statistics_releases(released)


def test_refusals_name_the_argument():
    records = _records()
    head = ProjectedFeatureClassifier(SHAPE, 2, norm_groups=3, components=20)
    with pytest.raises(PrivacyBudgetExhaustedError, match="releases before training"):
        _trainer(_released(records, sigma=1.0), records)  # the release alone spends ε = 4.4 > 3
    with pytest.raises(RuntimeError, match="release_statistics"):
        head(torch.zeros(2, *SHAPE))
    with pytest.raises(TypeError, match="data"):
        head.release_statistics(DataLoader(Dataset(records), batch_size=10), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="components"):
        ProjectedFeatureClassifier(SHAPE, 2, components=55)
    head.release_statistics(records, noise_multiplier=1.0)
    with pytest.raises(RuntimeError, match="once"):
        head.release_statistics(records, noise_multiplier=1.0)
    for r in records:
        r["patient_id"] = "p" + str(int(r["label"]))
    with pytest.raises(DPConfigurationError, match="privacy_unit"):
        _trainer(head, records, privacy_unit="patient")


def test_a_release_after_the_trainer_was_built_is_refused_before_the_first_step():
    records = _records()
    head = ProjectedFeatureClassifier(SHAPE, 2, norm_groups=3, components=20)
    trainer = _trainer(head, records)
    head.release_statistics(records, noise_multiplier=4.0)  # the trainer never saw it: its weights changed since
    with pytest.raises(DPConfigurationError, match="no history found"):
        trainer.run()
