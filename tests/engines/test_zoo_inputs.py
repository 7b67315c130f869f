"""What model-zoo configs hand the trainer: a network wrapped in DataParallel/DistributedDataParallel (multi-GPU
configs) is unwrapped, logged, and its module trained with the DP optimizer (the wrapper keeps seeing the trained,
converted module); a Dice loss with ``batch=True`` is switched to per-example, logged."""

from __future__ import annotations

import logging
import socket

import pytest
import torch
import torch.distributed as dist
from monai.data import DataLoader
from monai.losses import DiceCELoss
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.engines.optimizer import PrivateNoiseDPOptimizer
from tests.conftest import TinyClassifier, make_classification_data


def _trainer(network: nn.Module, loss_function=None, **kw) -> DPSupervisedTrainer:
    return DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(make_classification_data(n=16),
                               batch_size=4), network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.5),
                               loss_function=loss_function or nn.CrossEntropyLoss(), noise_multiplier=1.0,
                               max_grad_norm=1.0, target_delta=1e-3, sampling_seed=0, noise_seed=0, **kw)


def _check_unwrapped(wrapper: nn.Module, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="monai_dp.engines.trainer"):
        trainer = _trainer(wrapper)
    assert trainer.network is wrapper.module
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in wrapper.modules())
    assert isinstance(trainer.optimizer, PrivateNoiseDPOptimizer)
    assert f"network: {type(wrapper).__name__} unwrapped; its module (TinyClassifier) is trained" in caplog.text
    before = [p.detach().clone() for p in wrapper.parameters()]
    trainer.run()
    assert trainer.dp_steps == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, wrapper.parameters()))


def test_data_parallel_is_unwrapped(caplog):
    _check_unwrapped(nn.DataParallel(TinyClassifier()), caplog)


@pytest.mark.distributed
def test_distributed_data_parallel_is_unwrapped(caplog):
    """A one-process gloo group (a DDP module cannot exist without one); two processes: tests/bundles."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _check_unwrapped(nn.parallel.DistributedDataParallel(TinyClassifier()), caplog)
    finally:
        dist.destroy_process_group()


def test_batch_dice_loss_is_switched_by_the_trainer(caplog):
    loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    with caplog.at_level(logging.WARNING, logger="monai_dp.losses.checks"):
        trainer = _trainer(TinyClassifier(), loss)
    assert trainer.loss_function is loss and loss.dice.batch is False
    assert "loss_function.dice.batch: True -> False" in caplog.text


def test_distributed_sampler_over_the_whole_dataset_is_dropped(caplog):
    """multi_gpu_train.json gives the loader a DistributedSampler; the DP trainer shards Poisson sampling itself."""
    from torch.utils.data import DistributedSampler, SequentialSampler

    from monai_dp.data.poisson import check_loader_sampling
    from monai_dp.engines.builder import _without_distributed_sampler

    data = make_classification_data(n=10)
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1))
    with caplog.at_level(logging.INFO, logger="monai_dp.engines.trainer"):
        plain = _without_distributed_sampler(loader, world=2)
    assert type(plain.sampler) is SequentialSampler and len(plain.sampler) == 10
    assert plain.batch_sampler.batch_size == 2 and not plain.batch_sampler.drop_last
    assert "DistributedSampler over the whole dataset dropped" in caplog.text
    check_loader_sampling(plain)
    # not this job's sharding, or not over the loader's dataset: left in place, and refused
    other = DataLoader(data, batch_size=2, sampler=DistributedSampler(data[:6], num_replicas=2, rank=0))
    for kept in (_without_distributed_sampler(loader, world=3), _without_distributed_sampler(other, world=2)):
        assert isinstance(kept.sampler, DistributedSampler)
        with pytest.raises(ValueError, match=r"`train_data_loader.sampler` must be the loader's default"):
            check_loader_sampling(kept)
