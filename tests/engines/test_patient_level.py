"""Patient-level DP-SGD: patients are sampled, each patient's records are clipped together, patients are counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from torch import nn

from monai_dp.data import GROUP_KEY, PatientDataset, is_empty_batch
from monai_dp.engines import DPSupervisedTrainer
from monai_dp.privacy import create_accountant
from tests.conftest import TinyClassifier, make_classification_data
from tests.engines.test_dp_step import CLIP, SEED, SIGMA, _reference_update, _run_one_iteration

# 12 patients with 1..5 records each (40 records)
RECORDS_PER_PATIENT = [1, 2, 5, 3, 4, 1, 5, 2, 4, 3, 5, 5]


def _patient_data(n_big: float = 1.0) -> list[dict]:
    data = make_classification_data(n=sum(RECORDS_PER_PATIENT))
    pid = np.repeat([f"P{i:02d}" for i in range(len(RECORDS_PER_PATIENT))], RECORDS_PER_PATIENT)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data))  # a patient's records are not contiguous in the datalist
    out = []
    for j in order:
        rec = dict(data[j])
        rec["patient_id"] = str(pid[j])
        rec["index"] = int(j)
        out.append(rec)
    return out


def _trainer(data, batch_size=3, **kw):
    torch.manual_seed(0)
    net = TinyClassifier()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    loader = DataLoader(Dataset(data), batch_size=batch_size)
    kw.setdefault("noise_multiplier", SIGMA)
    kw.setdefault("max_grad_norm", CLIP)
    kw.setdefault("noise_seed", SEED)
    kw.setdefault("sampling_seed", 7)
    return DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=loader, network=net, optimizer=opt,
                               loss_function=nn.CrossEntropyLoss(), privacy_unit="patient", **kw)


def _first_nonempty(trainer):
    for batch in trainer.data_loader:
        if not is_empty_batch(batch):
            return batch
    raise AssertionError("no non-empty batch")


def test_accounts_patients_not_records():
    trainer = _trainer(_patient_data(), batch_size=3)
    p = trainer.privacy
    assert p.unit == "patient"
    assert p.num_units == len(RECORDS_PER_PATIENT)
    assert p.sample_rate == pytest.approx(3 / len(RECORDS_PER_PATIENT))
    assert p.delta == pytest.approx(min(1e-5, 1 / (10 * len(RECORDS_PER_PATIENT))))
    assert p.patients["num_patients"] == 12 and p.patients["max"] == 5 and p.patients["num_records"] == 40
    assert len(trainer.data_loader) == int(1 / p.sample_rate)


def test_batch_holds_every_record_of_each_sampled_patient_as_one_group():
    data = _patient_data()
    trainer = _trainer(data)
    per_patient = {}
    for r in data:
        per_patient.setdefault(r["patient_id"], set()).add(r["index"])
    batch = _first_nonempty(trainer)
    groups = batch[GROUP_KEY].tolist()
    pids, idx = list(batch["patient_id"]), batch["index"].tolist()
    for g in set(groups):
        rows = [i for i, gg in enumerate(groups) if gg == g]
        assert len({pids[i] for i in rows}) == 1, "a group must be one patient"
        assert {idx[i] for i in rows} == per_patient[pids[rows[0]]], "all of the patient's records"
    assert len({pids[i] for i in range(len(pids))}) == len(set(groups)), "a patient is one group"


def test_update_equals_reference_per_patient_dp_sgd():
    """The trainer's update from its own patient-level batch equals DP-SGD written out with per-patient clipping."""
    data = _patient_data()
    trainer = _trainer(data, batch_size=3)
    batch = _first_nonempty(trainer)
    groups = batch[GROUP_KEY]
    assert int(groups.max()) >= 1 and len(groups) > int(groups.max()) + 1, "want several patients, some with >1 record"
    expected = _reference_update(trainer.network, batch["image"], batch["label"], groups, expected_batch_size=3)
    per_record = _reference_update(trainer.network, batch["image"], batch["label"], torch.arange(len(groups)), 3)
    _run_one_iteration(trainer, batch)
    for p, e in zip(trainer.network.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(e, w) for e, w in zip(expected, per_record)), "patient grouping must matter"
    assert trainer.dp_steps == 1


def test_one_patient_whole_contribution_bounded_by_clip_norm():
    """Adding a patient with 5 records of huge gradients moves the pre-noise sum by at most C."""
    data = _patient_data()
    big = [r for r in data if r["patient_id"] == "P02"]
    assert len(big) == 5
    for r in big:
        r["image"] = r["image"] * 100.0
    trainer = _trainer(data)
    units: PatientDataset = trainer.data_loader.dataset
    collate = trainer.data_loader.collate_fn
    p_big = units.patients.index("P02")
    others = [units.patients.index(p) for p in ("P00", "P03", "P07")]
    sums = []
    for items in (others, others + [p_big]):
        batch = collate([units[i] for i in items])
        trainer.optimizer.zero_grad()
        for _, p in trainer.dp_network_params:
            p.summed_grad = None
        x, y, g = batch["image"], batch["label"], batch[GROUP_KEY]
        grads, _, _ = trainer.grad_sampler(x, y, g, int(g.max()) + 1)
        for name, p in trainer.dp_network_params:
            p.grad_sample = grads[name]
        trainer.optimizer.signal_skip_step(do_skip=True)
        trainer.optimizer.step()
        sums.append(torch.cat([p.summed_grad.flatten() for _, p in trainer.dp_network_params]))
    diff = float((sums[1] - sums[0]).norm())
    assert 0.5 * CLIP < diff <= CLIP * (1 + 1e-4)


def test_patients_are_poisson_sampled_with_all_records():
    data = _patient_data()
    trainer = _trainer(data, batch_size=3)
    q = trainer.privacy.sample_rate
    hits = {p: 0 for p in trainer.data_loader.dataset.patients}
    rows_seen = {p: set() for p in hits}
    steps = 0
    for _ in range(100):
        for batch in trainer.data_loader:
            steps += 1
            if is_empty_batch(batch):
                continue
            for pid in set(batch["patient_id"]):
                hits[pid] += 1
            for pid, i in zip(batch["patient_id"], batch["index"].tolist()):
                rows_seen[pid].add(i)
    for pid, h in hits.items():
        # binomial(steps, q): 5 standard deviations
        assert abs(h - steps * q) < 5 * math.sqrt(steps * q * (1 - q)), pid
    counts = dict(zip(*np.unique([r["patient_id"] for r in data], return_counts=True)))
    assert {p: len(s) for p, s in rows_seen.items()} == {p: int(c) for p, c in counts.items()}


def test_max_records_per_patient_draws_a_random_subset():
    data = _patient_data()
    units = PatientDataset(Dataset(data), [r["patient_id"] for r in data], max_records_per_patient=2)
    p = units.patients.index("P02")
    torch.manual_seed(0)
    draws = {tuple(r["index"] for r in units[p]) for _ in range(50)}
    assert all(len(d) == 2 for d in draws)
    assert len(draws) > 3, "the subset changes from step to step"
    trainer = _trainer(data, max_records_per_patient=2)
    batch = _first_nonempty(trainer)
    assert max(np.bincount(batch[GROUP_KEY].numpy())) <= 2


def test_trains_and_accounts_like_the_reference_accountant():
    trainer = _trainer(_patient_data(), batch_size=3, noise_multiplier=1.0)
    trainer.run()
    ref = create_accountant("prv")
    ref.step(1.0, 3 / 12, trainer.dp_steps)
    assert trainer.dp_steps == 4
    assert trainer.get_epsilon() == pytest.approx(ref.get_epsilon(trainer.privacy.delta), rel=1e-9)


def test_patient_errors():
    data = _patient_data()
    del data[3]["patient_id"]
    with pytest.raises(ValueError, match=r"`record 3 of the training data` must be a dict with the patient key "
                                         r"'patient_id'"):
        _trainer(data)
    with pytest.raises(ValueError, match=r"`privacy_unit` must be one of \['record', 'patient'\], got 'image'"):
        DPSupervisedTrainer(
            device="cpu", max_epochs=1, train_data_loader=DataLoader(Dataset(_patient_data()), batch_size=2),
            network=TinyClassifier(), optimizer=torch.optim.SGD(TinyClassifier().parameters(), lr=1.0),
            loss_function=nn.CrossEntropyLoss(), noise_multiplier=1.0, privacy_unit="image")
    with pytest.raises(ValueError, match=r"`batch_size \* accumulation_steps` must be <= the number of patients N = 12"):
        _trainer(_patient_data(), batch_size=13)
    with pytest.raises(ValueError, match=r"`max_records_per_patient` must be an int >= 1 or None, got 0"):
        _trainer(_patient_data(), max_records_per_patient=0)
    with pytest.raises(ValueError, match=r"`patient_ids` must be one id per record \(40 records\), got '3 ids'"):
        _trainer(_patient_data(), patient_ids=["a", "b", "c"])


def test_record_level_run_knows_records_per_patient():
    data = _patient_data()
    torch.manual_seed(0)
    net = TinyClassifier()
    trainer = DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(Dataset(data), batch_size=4),
                                  network=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                                  loss_function=nn.CrossEntropyLoss(), noise_multiplier=1.0)
    assert trainer.privacy.unit == "record" and trainer.privacy.num_units == 40
    assert trainer.privacy.patients["max"] == 5
