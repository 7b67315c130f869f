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
from .png import LoadPNGd, read_png
from .poisson import (
    DistributedPoissonBatchSampler,
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
    "dataset_length",
    "get_row_groups",
    "is_empty_batch",
    "load_datalist",
    "loader_batch_size",
    "make_distributed_poisson_loader",
    "make_poisson_loader",
    "make_synthetic_dataset",
    "read_png",
    "rebuild_loader",
]
