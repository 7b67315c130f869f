"""The synthetic audit data set: patients' records look alike, subgroups and atypical patients as documented."""

from __future__ import annotations

import numpy as np
import pytest

from monai_dp.audit import make_audit_dataset


def test_records_of_a_patient_share_anatomy_and_label():
    d = make_audit_dataset(num_patients=200, seed=1)
    imgs, pids = d["images"][:, 0], d["patient_ids"]
    assert imgs.shape[1:] == (28, 28) and len(imgs) == len(d["labels"]) == len(pids) > 200
    for p in np.unique(pids):
        assert len(set(d["labels"][pids == p].tolist())) == 1
    # correlation of two images of one patient vs two images of different patients (same label, same site)
    same, other = [], []
    major = d["metadata"]["group"] == "majority"
    for p in np.unique(pids[major]):
        idx = np.flatnonzero(pids == p)
        if len(idx) >= 2:
            same.append(np.corrcoef(imgs[idx[0]].ravel(), imgs[idx[1]].ravel())[0, 1])
            q = np.flatnonzero(major & (pids != p) & (d["labels"] == d["labels"][idx[0]]))[0]
            other.append(np.corrcoef(imgs[idx[0]].ravel(), imgs[q].ravel())[0, 1])
    assert np.mean(same) > np.mean(other) + 0.2


def test_subgroups_and_atypical_patients():
    d = make_audit_dataset(num_patients=2000, minority_fraction=0.1, label_noise=0.05, seed=2)
    meta, pids = d["metadata"], d["patient_ids"]
    first = np.unique(pids, return_index=True)[1]
    assert 0.08 < np.mean(meta["group"][first] == "minority") < 0.12
    assert 0.035 < np.mean(meta["atypical"][first] == "yes") < 0.065
    # inverted contrast at the other site: the blob is the darkest spot, not the brightest
    minority = meta["group"] == "minority"
    assert d["images"][minority].mean() < 0 < d["images"][~minority].mean()
    counts = np.bincount(np.unique(pids, return_inverse=True)[1])
    assert counts.min() == 1 and counts.max() == 6
    assert make_audit_dataset(num_patients=30, seed=5)["images"].tobytes() == \
        make_audit_dataset(num_patients=30, seed=5)["images"].tobytes()


@pytest.mark.parametrize("kwargs, name", [({"label_noise": 0.5}, "label_noise"), ({"anatomy": -1}, "anatomy"),
                                          ({"size": 8}, "size"), ({"num_patients": 0}, "num_patients")])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_audit_dataset(**kwargs)


def test_atypical_patients_carry_a_marker_on_every_image():
    plain = make_audit_dataset(num_patients=300, label_noise=0.1, marker=0.0, seed=3)
    marked = make_audit_dataset(num_patients=300, label_noise=0.1, marker=2.0, seed=3)
    atypical = marked["metadata"]["atypical"] == "yes"
    diff = marked["images"] - plain["images"]
    assert atypical.any() and np.all(diff[~atypical] == 0)
    for p in np.unique(marked["patient_ids"][atypical]):
        d = diff[marked["patient_ids"] == p]
        assert np.allclose(d, d[0]) and np.isclose(np.abs(d[0]).sum(), 16 * 2.0, rtol=1e-5)  # one 4x4 square
