from .checks import CheckLabelRanged
from .collate import EMPTY_BATCH_KEY, GROUP_KEY, DPCollate, GroupedBatch, get_row_groups, is_empty_batch
from .datalist import load_datalist
from .synthetic import make_synthetic_dataset
from .png import LoadPNGd, read_png
from .poisson import (
    DistributedPoissonBatchSampler,
    dataset_length,
    loader_batch_size,
    make_distributed_poisson_loader,
    make_poisson_loader,
    rebuild_loader,
)

__all__ = [
    "EMPTY_BATCH_KEY",
    "GROUP_KEY",
    "DPCollate",
    "GroupedBatch",
    "get_row_groups",
    "is_empty_batch",
    "dataset_length",
    "loader_batch_size",
    "make_poisson_loader",
    "rebuild_loader",
    "DistributedPoissonBatchSampler",
    "make_distributed_poisson_loader",
    "CheckLabelRanged",
    "load_datalist",
    "make_synthetic_dataset",
    "LoadPNGd",
    "read_png",
]
