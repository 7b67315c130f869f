"""Poisson-sampled data loaders for DP-SGD.

The privacy analysis of DP-SGD (the sampled Gaussian mechanism) assumes each item enters a step
independently with probability ``sample_rate``. :func:`make_poisson_loader` rebuilds a user's
``DataLoader`` with Opacus' ``UniformWithReplacementSampler`` (which draws exactly that) and keeps
everything else of the loader: dataset, workers, collate, pinning, worker initialisation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from monai_dp.data.collate import DPCollate
from monai_dp.utils.validation import check_sample_rate, error_message

__all__ = [
    "DistributedPoissonBatchSampler",
    "dataset_length",
    "loader_batch_size",
    "make_distributed_poisson_loader",
    "make_poisson_loader",
    "check_loader_sampling",
    "rebuild_loader",
]

logger = logging.getLogger(__name__)

_FIX_LOADER = "Pass a torch/MONAI `DataLoader` over a dataset with `__len__` and a `batch_size`."
_FIX_ITERABLE = ("Poisson sampling draws items by index, so it needs a map-style dataset; use "
                 "monai.data.Dataset (or CacheDataset) over the datalist.")
_FIX_SUBSET = ("Poisson sampling replaces the sampler and draws from the whole dataset, so a held-out part would "
               "be trained on; pass the part to train on as the dataset (`torch.utils.data.Subset(dataset, "
               "indices)`) with shuffle=True or False. Reweight classes in the loss, not in the sampler.")


def dataset_length(loader: Any) -> int:
    """Number of items of the loader's dataset; raises a clear error when it has none."""
    if not isinstance(loader, DataLoader):
        raise TypeError(error_message("train_data_loader", "a torch.utils.data.DataLoader", type(loader).__name__, _FIX_LOADER))
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            error_message("train_data_loader.dataset", "a dataset with a length", type(loader.dataset).__name__,
                          "DP accounting needs the number of items N; use a map-style dataset.")
        ) from None
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError(error_message("train_data_loader.dataset", "a map-style dataset (not an IterableDataset)",
                                      type(loader.dataset).__name__, _FIX_ITERABLE))
    if not n > 0:
        raise ValueError(error_message("train_data_loader.dataset", "non-empty", f"{n} items", "Check the datalist."))
    return int(n)


def _sampler_problem(sampler: Any, n: int) -> str | None:
    """Why ``sampler`` is not a plain pass over all ``n`` items (``None`` when it is)."""
    if type(sampler) is SequentialSampler:
        return None if len(sampler) == n else f"a SequentialSampler over {len(sampler)} of the {n} items"
    if type(sampler) is RandomSampler:
        if sampler.replacement:
            return "a RandomSampler with replacement=True"
        if sampler.num_samples != n:
            return f"a RandomSampler with num_samples={sampler.num_samples} (the dataset has {n} items)"
        return None
    return type(sampler).__name__


def check_loader_sampling(loader: DataLoader) -> None:
    """Refuse a loader whose sampling Poisson sampling cannot replace without changing what is trained on.

    Poisson sampling draws from the whole dataset, so only the loader's default sampling is accepted: a
    ``SequentialSampler`` or a ``RandomSampler`` (without replacement, all items) inside the default
    ``BatchSampler``. A restricting or reweighting sampler (``SubsetRandomSampler``, ``WeightedRandomSampler``, a
    custom sampler or batch sampler) is refused: the subset must be the dataset. A ``DistributedSampler`` is
    refused too: under ``torchrun`` the DP trainer shards the Poisson sampling itself.
    """
    n = dataset_length(loader)
    for name in ("sampler", "batch_sampler"):
        if isinstance(getattr(loader, name, None), DistributedSampler):
            raise ValueError(error_message(
                f"train_data_loader.{name}", "the loader's default (sequential or shuffled) sampler",
                "DistributedSampler", "Pass the plain loader over the whole dataset: under torchrun the DP trainer "
                "shards Poisson sampling across processes itself."))
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        raise ValueError(error_message("train_data_loader.batch_sampler", "the default BatchSampler",
                                       type(batch_sampler).__name__, _FIX_SUBSET))
    sampler = batch_sampler.sampler if batch_sampler is not None else loader.sampler
    problem = _sampler_problem(sampler, n)
    if problem is not None:
        raise ValueError(error_message("train_data_loader.sampler", "a SequentialSampler or RandomSampler over all "
                                       f"{n} items (shuffle=True or False)", problem, _FIX_SUBSET))


def loader_batch_size(loader: DataLoader) -> int:
    """The loader's batch size (the expected logical batch size under Poisson sampling)."""
    bs = loader.batch_size
    if bs is None:
        bs = getattr(loader.batch_sampler, "batch_size", None)
    if not isinstance(bs, int) or not bs >= 1:
        raise ValueError(error_message("train_data_loader.batch_size", "an int >= 1", bs, _FIX_LOADER))
    return bs


def _loader_kwargs(loader: DataLoader) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": DPCollate(loader.collate_fn),
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
    }
    if loader.num_workers > 0:
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
        kwargs["persistent_workers"] = loader.persistent_workers
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return kwargs


def rebuild_loader(loader: DataLoader, batch_sampler: Any, dataset: Any = None) -> DataLoader:
    """A loader like ``loader`` (same class when it is MONAI's) that draws batches from ``batch_sampler``.

    ``dataset`` replaces the loader's dataset (e.g. a :class:`~monai_dp.data.patients.PatientDataset` over it).
    """
    kwargs = _loader_kwargs(loader)
    try:
        from monai.data import DataLoader as MonaiDataLoader
    except ImportError:  # pragma: no cover - monai is a hard dependency
        MonaiDataLoader = None
    cls = MonaiDataLoader if MonaiDataLoader is not None and isinstance(loader, MonaiDataLoader) else DataLoader
    return cls(loader.dataset if dataset is None else dataset, batch_sampler=batch_sampler, **kwargs)


def make_poisson_loader(
    loader: DataLoader, sample_rate: float, generator: torch.Generator | None = None, dataset: Any = None
) -> DataLoader:
    """Rebuild ``loader`` so that every item enters each batch independently with probability ``sample_rate``.

    One epoch is ``int(1 / sample_rate)`` batches, as in Opacus. Empty batches are returned as the marker
    of :func:`monai_dp.data.collate.is_empty_batch`. ``dataset`` replaces the loader's dataset (its items
    are then the sampled units, e.g. patients).

    The loader must be map-style with its default sampling (see :func:`check_loader_sampling`): a sampler that
    restricts or reweights the data would silently be replaced by sampling from the whole dataset.
    """
    check_loader_sampling(loader)
    n = dataset_length(loader) if dataset is None else len(dataset)
    sample_rate = check_sample_rate(sample_rate, fix="Lower the batch size.")
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=generator)
    return rebuild_loader(loader, sampler, dataset)


class DistributedPoissonBatchSampler:
    """Poisson sampling across processes: each rank holds the items ``rank::world_size`` and draws every one of
    them independently with probability ``sample_rate``, so over all ranks each item is in a step with probability
    ``sample_rate``, as the accountant assumes.

    Unlike Opacus' ``DistributedUniformWithReplacementSampler`` it yields empty local batches too, so every rank
    takes the same number of steps (the gradient all-reduce needs every rank at every step).

    Args:
        num_samples: dataset size N (over all ranks).
        sample_rate: probability q of each item per step.
        rank, world_size: this process and the number of processes.
        generator: a generator of this rank; must differ between ranks (see ``make_poisson_loader``).
    """

    def __init__(self, num_samples: int, sample_rate: float, rank: int, world_size: int,
                 generator: torch.Generator | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(error_message("rank", f"in [0, world_size = {world_size})", rank))
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.rank, self.world_size = int(rank), int(world_size)
        self.generator = generator
        self.indices = torch.arange(self.rank, self.num_samples, self.world_size)
        self.steps = int(1 / self.sample_rate)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            mask = torch.rand(len(self.indices), generator=self.generator) < self.sample_rate
            yield self.indices[mask].tolist()


def _rank_generator(sampling_seed: int | None, rank: int) -> torch.Generator:
    """This rank's sampling generator: from the OS's entropy (independent between ranks), or from the seed."""
    from monai_dp.utils.randomness import private_generator

    if sampling_seed is None:
        return private_generator("cpu")
    return private_generator("cpu", (int(sampling_seed) * 1_000_003 + rank) % 2**64)


def make_distributed_poisson_loader(loader: DataLoader, sample_rate: float, rank: int, world_size: int,
                                    sampling_seed: int | None = None, dataset: Any = None) -> DataLoader:
    """Rebuild ``loader`` with :class:`DistributedPoissonBatchSampler` for this rank (``dataset``: see above)."""
    check_loader_sampling(loader)
    n = dataset_length(loader) if dataset is None else len(dataset)
    sample_rate = check_sample_rate(sample_rate, fix="Lower the batch size.")
    sampler = DistributedPoissonBatchSampler(n, sample_rate, rank, world_size, _rank_generator(sampling_seed, rank))
    return rebuild_loader(loader, sampler, dataset)
