"""Patient ids of records that lack them (MONAI Label passes ``{image, label}`` only): from a pattern over the image
path or from the DICOM header's PatientID; else patient-level training is refused, saying how to give ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from torch import nn

from monai_dp.data.patients import PatientIdError, dicom_patient_id, patient_ids_of
from monai_dp.engines import DPSupervisedTrainer
from tests.conftest import TinyClassifier


def _write_dicom(path, patient_id: str) -> str:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = patient_id, "Test^Patient"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def _trainer(records, **kw):
    torch.manual_seed(0)
    net = TinyClassifier()
    return DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(Dataset(records), batch_size=2),
                               network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                               loss_function=nn.CrossEntropyLoss(), noise_multiplier=1.0, target_delta=1e-3, **kw)


# what MONAI Label's datastore hands a bundle: absolute image and label paths, nothing else
LABEL_RECORDS = [{"image": f"/studies/P{p:03d}_scan{s}.nii.gz", "label": f"/studies/labels/final/P{p:03d}_scan{s}.nii.gz"}
                 for p in (1, 2, 3) for s in (1, 2)]


def test_pattern_named_group_gives_the_ids():
    ids = patient_ids_of(Dataset(LABEL_RECORDS), pattern=r"(?P<patient>P\d+)_scan\d+\.nii")
    assert ids == ["P001", "P001", "P002", "P002", "P003", "P003"]


def test_pattern_first_group_and_normalisation():
    ids = patient_ids_of(Dataset(LABEL_RECORDS), pattern=r"P(\d+)_")
    assert ids == ["1", "1", "2", "2", "3", "3"]  # '001' is the integer 1, as in the datalists


def test_record_key_wins_over_the_pattern():
    records = [dict(r, patient_id="same") if i < 2 else r for i, r in enumerate(LABEL_RECORDS)]
    assert patient_ids_of(Dataset(records), pattern=r"(P\d+)_")[:3] == ["same", "same", "P002"]


def test_patient_level_trainer_samples_the_patients_the_pattern_finds():
    trainer = _trainer(LABEL_RECORDS, privacy_unit="patient", patient_id_pattern=r"(?P<patient>P\d+)_")
    assert trainer.privacy.num_units == 3 and trainer.privacy.patients["max"] == 2
    assert trainer.privacy.sample_rate == pytest.approx(2 / 3)


def test_pattern_that_does_not_match_is_refused():
    with pytest.raises(PatientIdError, match=r"`record 4\['image'\]` must be a path matching patient_id_pattern "
                                             r"'\(P00\[12\]\)_', got '/studies/P003_scan1.nii.gz'"):
        _trainer(LABEL_RECORDS, privacy_unit="patient", patient_id_pattern=r"(P00[12])_")
    with pytest.raises(ValueError, match=r"`patient_id_pattern` must be a valid regular expression, got '\(P'"):
        patient_ids_of(Dataset(LABEL_RECORDS), pattern="(P")


def test_without_ids_patient_level_is_refused_saying_how_to_give_them():
    with pytest.raises(ValueError, match=r"`record 0 of the training data` must be a dict with the patient key "
                                         r"'patient_id', or a DICOM image, got \['image', 'label'\]\. Give every record "
                                         r"a patient id under `patient_key`, pass `patient_id_pattern`.*DICOM"):
        _trainer(LABEL_RECORDS, privacy_unit="patient")
    assert _trainer(LABEL_RECORDS).privacy.patients is None  # record level: no patient-level statement, no error


def test_dicom_patient_id_from_files_and_series_folders(tmp_path):
    records = []
    for p, pid in enumerate(["PAT-7", "PAT-9"]):
        for s in range(2):
            records.append({"image": _write_dicom(tmp_path / f"img{p}{s}.dcm", pid), "label": p})
    series = tmp_path / "series"
    series.mkdir()
    _write_dicom(series / "0001", "PAT-11")  # no suffix: recognised by the DICM preamble
    _write_dicom(series / "0002", "PAT-11")
    records.append({"image": str(series), "label": 0})
    assert dicom_patient_id(series) == "PAT-11" and dicom_patient_id(tmp_path / "nothing.nii.gz") is None
    assert patient_ids_of(Dataset(records)) == ["PAT-7", "PAT-7", "PAT-9", "PAT-9", "PAT-11"]
    trainer = _trainer(records, privacy_unit="patient")
    assert trainer.privacy.num_units == 3 and trainer.privacy.patients["num_records"] == 5


def test_anonymised_dicom_is_refused(tmp_path):
    records = [{"image": _write_dicom(tmp_path / f"a{i}.dcm", ""), "label": 0} for i in range(2)]
    with pytest.raises(PatientIdError, match=r"`PatientID of DICOM file '.*a0\.dcm'` must be a non-empty patient id, "
                                             r"got ''\. Give every record a patient id"):
        _trainer(records, privacy_unit="patient")
