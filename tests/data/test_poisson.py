"""Poisson sampling at the accounted rate, row-to-item maps for multi-crop transforms, empty batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import (
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler
from monai.transforms import Compose, RandCropByPosNegLabeld

from monai_dp.data import (
    EMPTY_BATCH_KEY,
    GROUP_KEY,
    DPCollate,
    GroupedBatch,
    check_loader_sampling,
    dataset_length,
    get_row_groups,
    make_distributed_poisson_loader,
    make_poisson_loader,
)
from tests.conftest import make_classification_data


def test_batches_are_poisson_at_the_sample_rate():
    data = list(range(200))
    loader = make_poisson_loader(DataLoader(data, batch_size=10), 0.05, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 20
    sizes, counts = [], np.zeros(200)
    for _ in range(50):  # 50 epochs x 20 steps
        for batch in loader:
            if isinstance(batch, dict) and batch.get(EMPTY_BATCH_KEY):
                sizes.append(0)
                continue
            idx = list(batch)
            sizes.append(len(idx))
            counts[idx] += 1
    sizes = np.array(sizes)
    # batch size ~ Binomial(200, 0.05): mean 10, variance 9.5 (a fixed batch size would have variance 0)
    assert abs(sizes.mean() - 10) < 0.5
    assert 7 < sizes.var() < 12
    # each item is in ~ 1000 * 0.05 = 50 batches, independently
    assert abs(counts.mean() - 50) < 1.5


def test_multi_crop_rows_map_to_their_item():
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        label = (rng.random((1, 16, 16)) > 0.7).astype(np.float32)
        records.append({"image": rng.normal(size=(1, 16, 16)).astype(np.float32), "label": label})
    crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(8, 8), num_samples=4)
    ds = Dataset(records, transform=Compose([crop]))
    loader = make_poisson_loader(DataLoader(ds, batch_size=3), 0.99, generator=torch.Generator().manual_seed(1))
    batch = next(iter(loader))
    groups = batch[GROUP_KEY]
    assert batch["image"].shape[0] == 4 * (int(groups.max()) + 1)
    assert groups.tolist() == sorted(groups.tolist())
    assert torch.bincount(groups).tolist() == [4] * (int(groups.max()) + 1)


def test_empty_and_sequence_batches():
    collate = DPCollate()
    assert collate([]) == {EMPTY_BATCH_KEY: True}
    out = collate([(torch.zeros(2), torch.tensor(0)), (torch.ones(2), torch.tensor(1))])
    assert isinstance(out, GroupedBatch) and get_row_groups(out).tolist() == [0, 1]
    d = collate([{"image": torch.zeros(1)}])
    assert d[GROUP_KEY].tolist() == [0]


def test_grouped_batches_survive_worker_processes():
    data = make_classification_data(n=20)
    loader = make_poisson_loader(DataLoader(data, batch_size=5, num_workers=1), 0.5,
                                 generator=torch.Generator().manual_seed(0))
    batch = next(b for b in loader if not b.get(EMPTY_BATCH_KEY))
    assert batch[GROUP_KEY].numel() == batch["image"].shape[0]


def test_multi_crop_trainer_clips_per_image(monkeypatch):
    """End to end: with 4 crops per image the trainer clips per image (rows summed), checked on one batch."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from monai_dp.engines import DPSupervisedTrainer

    rng = np.random.default_rng(0)
    records = [{"image": rng.normal(size=(1, 16, 16)).astype(np.float32),
                "label": (rng.random((1, 16, 16)) > 0.7).astype(np.float32)} for _ in range(8)]
    crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(8, 8), num_samples=4)
    ds = Dataset(records, transform=crop)
    net = UNet(2, 1, 2, (4, 8), (2,), norm="instance")
    trainer = DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(ds, batch_size=2),
                                  network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                  loss_function=DiceCELoss(to_onehot_y=True, softmax=True), noise_multiplier=1.0,
                                  max_grad_norm=1.0, target_delta=1e-2, sampling_seed=3, grad_sample_mode="per_sample")
    seen = []
    engine = type(trainer.grad_sampler)
    orig = engine.__call__

    def spy(self, x, y, groups=None, num_items=None, amp_dtype=None):
        grads, losses, preds = orig(self, x, y, groups, num_items, amp_dtype)
        seen.append((x.shape[0], num_items, next(iter(grads.values())).shape[0]))
        return grads, losses, preds

    monkeypatch.setattr(engine, "__call__", spy)
    trainer.run()
    assert seen, "at least one non-empty batch"
    for rows, items, grad_rows in seen:
        assert rows == 4 * items == 4 * grad_rows


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: dict(sampler=WeightedRandomSampler([1.0] * 20, 20)),
         r"`train_data_loader.sampler` must be a SequentialSampler or RandomSampler over all 20 items "
         r"\(shuffle=True or False\), got 'WeightedRandomSampler'. .*torch.utils.data.Subset\(dataset, indices\)"),
        (lambda d: dict(sampler=SubsetRandomSampler(range(10))), r"got 'SubsetRandomSampler'. .*held-out"),
        (lambda d: dict(sampler=RandomSampler(d, replacement=True)), r"got 'a RandomSampler with replacement=True'"),
        (lambda d: dict(sampler=RandomSampler(d, num_samples=10)),
         r"got 'a RandomSampler with num_samples=10 \(the dataset has 20 items\)'"),
        (lambda d: dict(sampler=SequentialSampler(range(10))), r"got 'a SequentialSampler over 10 of the 20 items'"),
        (lambda d: dict(sampler=Every2nd()), r"got 'Every2nd'"),
    ],
)
def test_restricting_samplers_are_refused(make, match):
    data = list(range(20))
    with pytest.raises(ValueError, match=match):
        make_poisson_loader(DataLoader(data, batch_size=4, **make(data)), 0.2)


class Every2nd(Sampler):
    def __iter__(self):
        return iter(range(0, 20, 2))

    def __len__(self):
        return 10


def test_custom_batch_sampler_is_refused():
    data = list(range(20))
    loader = TorchDataLoader(data, batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"`train_data_loader.batch_sampler` must be the default BatchSampler, "
                                         r"got 'list'. .*Subset"):
        make_poisson_loader(loader, 0.2)


def test_distributed_sampler_is_refused_with_the_fix():
    data = list(range(20))
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    match = (r"`train_data_loader.sampler` must be the loader's default \(sequential or shuffled\) sampler, got "
             r"'DistributedSampler'. Pass the plain loader .* the DP trainer shards")
    with pytest.raises(ValueError, match=match):
        make_poisson_loader(loader, 0.2)
    with pytest.raises(ValueError, match=match):
        make_distributed_poisson_loader(loader, 0.2, rank=0, world_size=2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_default_samplers_are_accepted(shuffle):
    data = list(range(20))
    for loader in (TorchDataLoader(data, batch_size=4, shuffle=shuffle), DataLoader(Dataset(data), batch_size=4,
                                                                                    shuffle=shuffle)):
        check_loader_sampling(loader)
        assert len(make_poisson_loader(loader, 0.2)) == 5


class SizedStream(IterableDataset):
    def __iter__(self):
        yield from range(8)

    def __len__(self):
        return 8


def test_iterable_dataset_with_length_is_refused_up_front(recwarn):
    loader = TorchDataLoader(SizedStream(), batch_size=4)
    match = (r"`train_data_loader.dataset` must be a map-style dataset \(not an IterableDataset\), got 'SizedStream'. "
             r"Poisson sampling draws items by index, .*monai.data.Dataset \(or CacheDataset\)")
    with pytest.raises(TypeError, match=match):
        dataset_length(loader)
    with pytest.raises(TypeError, match=match):
        make_poisson_loader(loader, 0.5)
    with pytest.raises(TypeError, match=match):
        make_distributed_poisson_loader(loader, 0.5, rank=0, world_size=1)
    assert not [w for w in recwarn if "replaced" in str(w.message)]


def test_iterable_dataset_without_length_keeps_its_message():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(8)

    with pytest.raises(TypeError, match=r"`train_data_loader.dataset` must be a dataset with a length, got 'Stream'"):
        dataset_length(TorchDataLoader(Stream(), batch_size=4))
