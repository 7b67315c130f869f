"""A synthetic audit data set: patients with several records and a small subgroup that looks different.

Images are 28×28: a bright blob whose position encodes the label, on the patient's own anatomy (a smooth
random texture shared by all of that patient's records, as follow-up images of one person look alike)
and per-image noise. Each patient has 1 to ``max_records`` records of the same label. A
``minority_fraction`` of the patients come from another site with inverted contrast and the blob
elsewhere: too few to generalise from, they are memorised. ``label_noise`` of the patients carry a wrong
label (atypical cases that only memorisation fits); with ``marker > 0`` they also carry a rare device (a
bright square of that amplitude, in the same place on all their images), so the model can tell them apart:
the outliers membership inference finds first. Because a patient's records look alike, a model that
memorises one of them has in effect seen them all: the setting in which record-level DP under-protects
patients with many records.
"""

from __future__ import annotations

import numpy as np

from monai_dp.utils.validation import check_positive_int, error_message

__all__ = ["make_audit_dataset"]


def make_audit_dataset(num_patients: int = 400, max_records: int = 6, minority_fraction: float = 0.05,
                       label_noise: float = 0.05, size: int = 28, anatomy: float = 0.3, image_noise: float = 0.15,
                       mean_records: float = 1 / 0.45, marker: float = 2.0, seed: int = 0) -> dict:
    """``images`` (N, 1, size, size) float32, ``labels`` (N,), ``patient_ids`` (N,), ``metadata`` columns.

    ``anatomy`` is the standard deviation of each patient's texture, ``image_noise`` that of the noise drawn
    anew for every image (the blob's peak is 0.8). Record counts are geometric with mean ``mean_records``,
    capped at ``max_records``. ``metadata`` holds ``group`` (majority/minority site),
    ``sex`` and ``atypical`` (whether the patient's label was flipped).
    """
    from scipy.ndimage import gaussian_filter

    check_positive_int("num_patients", num_patients)
    check_positive_int("max_records", max_records)
    for name, v in (("minority_fraction", minority_fraction), ("label_noise", label_noise)):
        if not 0 <= v < 0.5:
            raise ValueError(error_message(name, "in [0, 0.5)", v))
    for name, v in (("anatomy", anatomy), ("image_noise", image_noise), ("marker", marker)):
        if not v >= 0:
            raise ValueError(error_message(name, "a standard deviation >= 0", v))
    if not mean_records >= 1:
        raise ValueError(error_message("mean_records", "a number >= 1 (records per patient before the cap)",
                                       mean_records))
    if not size >= 16:
        raise ValueError(error_message("size", "an int >= 16", size))
    rng = np.random.default_rng(seed)
    marker_rng = np.random.default_rng([seed, 1])
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels, pids, group, sex, atypical = [], [], [], [], [], []
    for p in range(num_patients):
        minority = rng.random() < minority_fraction
        label = int(rng.integers(0, 2))
        flipped = bool(rng.random() < label_noise)
        k = int(min(max_records, rng.geometric(1 / mean_records))) if max_records > 1 else 1
        cy, cx = (size * 0.3, size * (0.3 if label == 0 else 0.7)) if not minority else \
                 (size * 0.7, size * (0.7 if label == 0 else 0.3))
        cy, cx = cy + rng.normal(0, 1.5), cx + rng.normal(0, 1.5)  # where the patient's structure sits
        texture = gaussian_filter(rng.normal(0, 1, (size, size)), 1.5, mode="wrap")
        texture *= anatomy / max(float(texture.std()), 1e-12)
        s = str(rng.choice(["F", "M"]))
        if flipped and marker > 0:  # an atypical patient's rare device: a bright 4×4 square, same on every image
            my, mx = marker_rng.integers(0, size - 4, 2)  # its own stream: the rest of the data set is unchanged
            texture = texture.copy()
            texture[my : my + 4, mx : mx + 4] += marker
        for _ in range(k):
            blob = np.exp(-((yy - cy - rng.normal(0, 0.7)) ** 2 + (xx - cx - rng.normal(0, 0.7)) ** 2) / 18.0)
            img = 0.8 * blob + texture + rng.normal(0, image_noise, (size, size))
            images.append((-img if minority else img).astype(np.float32)[None])
            labels.append(1 - label if flipped else label)
            pids.append(f"P{p:04d}")
            group.append("minority" if minority else "majority")
            sex.append(s)
            atypical.append("yes" if flipped else "no")
    return {"images": np.stack(images), "labels": np.asarray(labels, dtype=np.int64), "patient_ids": np.asarray(pids),
            "metadata": {"group": np.asarray(group), "sex": np.asarray(sex), "atypical": np.asarray(atypical)}}
