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


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [2, 3])
def test_ghost_clipping_equals_per_sample_on_cuda(dims):
    """On the GPU (other kernels, TF32 off) ghost clipping gives the per-sample method's clipped sum."""
    from monai.losses import DiceCELoss
    from monai.networks import nets

    from monai_dp.networks import GhostClipping, PerSampleGradients, make_private_compatible

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    net = make_private_compatible(nets.UNet(dims, 1, 2, (4, 8, 16), (2, 2), num_res_units=1))[0].cuda().double()
    x = torch.randn(4, 1, *(16,) * dims, device="cuda", dtype=torch.float64)
    y = torch.randint(0, 2, (4, 1, *(16,) * dims), device="cuda")
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    grads, _, _ = PerSampleGradients(net, loss, method="expanded")(x, y)
    norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    c = float(norms.median())
    w = (c / (norms + 1e-6)).clamp(max=1.0)
    summed, ghost_norms, _, _ = GhostClipping(net, loss)(x, y, None, None, c)
    torch.testing.assert_close(ghost_norms, norms, rtol=1e-8, atol=1e-12)
    for n, g in grads.items():
        torch.testing.assert_close(summed[n], torch.einsum("i,i...->...", w, g), rtol=1e-6, atol=1e-10)


@pytest.mark.gpu
def test_ghost_bf16_norms_close_to_float32():
    """bf16 autocast changes the gradients a little; the norms stay within a few per cent of float32."""
    from monai_dp.networks import GhostClipping, make_private_compatible

    torch.manual_seed(0)
    net = make_private_compatible(TinyClassifier())[0].cuda()
    x, y = torch.randn(8, 1, 16, 16, device="cuda"), torch.randint(0, 2, (8,), device="cuda")
    gc = GhostClipping(net, nn.CrossEntropyLoss())
    _, n32, _, _ = gc(x, y, None, None, 1.0)
    _, n16, _, _ = gc(x, y, None, None, 1.0, torch.bfloat16)
    assert n16.dtype == torch.float32
    torch.testing.assert_close(n16, n32, rtol=5e-2, atol=1e-4)
