from .checks import CheckLabelRanged
from .collate import (
    EMPTY_BATCH_KEY,
    GROUP_KEY,
    DPCollate,
    GroupedBatch,
    get_row_groups,
    is_empty_batch,
)
from .datalist import load_datalist
from .patients import (
    PatientDataset,
    PatientIdError,
    normalize_patient_ids,
    patient_ids_of,
    records_per_patient_summary,
)
from .png import LoadPNGd, read_png
from .poisson import (
    DistributedPoissonBatchSampler,
    check_loader_sampling,
    dataset_length,
    loader_batch_size,
    make_distributed_poisson_loader,
    make_poisson_loader,
    rebuild_loader,
)
from .synthetic import make_synthetic_dataset

__all__ = [
    "EMPTY_BATCH_KEY",
    "GROUP_KEY",
    "CheckLabelRanged",
    "DPCollate",
    "DistributedPoissonBatchSampler",
    "GroupedBatch",
    "LoadPNGd",
    "PatientDataset",
    "PatientIdError",
    "check_loader_sampling",
    "dataset_length",
    "get_row_groups",
    "is_empty_batch",
    "load_datalist",
    "loader_batch_size",
    "make_distributed_poisson_loader",
    "make_poisson_loader",
    "make_synthetic_dataset",
    "normalize_patient_ids",
    "patient_ids_of",
    "read_png",
    "records_per_patient_summary",
    "rebuild_loader",
]
