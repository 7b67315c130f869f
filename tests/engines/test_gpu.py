"""GPU runs: skipped automatically without CUDA (see tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from tests.conftest import TinyClassifier, make_classification_data


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_trains_on_cuda(amp):
    net = TinyClassifier().cuda()
    trainer = DPSupervisedTrainer(device="cuda", max_epochs=1,
                                  train_data_loader=DataLoader(make_classification_data(40), batch_size=4),
                                  network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                  loss_function=nn.CrossEntropyLoss(), noise_multiplier=1.0, max_grad_norm=1.0,
                                  target_delta=1e-3, amp=amp, noise_seed=0)
    trainer.run()
    assert trainer.dp_steps == 10
    assert all(p.is_cuda and torch.isfinite(p).all() for p in net.parameters())
