"""Time per optimizer step of DP-SGD against ordinary training, for MONAI networks in 2D and 3D.

Runs both in one process on the same device, network, batch and optimizer, and prints a markdown
table with the DP / non-DP ratio. It measures; it asserts nothing.

    python benchmarks/step_time.py                     # all networks, CPU defaults
    python benchmarks/step_time.py --networks UNet --dims 3 --batch 4 --size 32
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from monai.networks import nets
from opacus.optimizers import DPOptimizer
from torch import nn

from monai_dp.networks import PerSampleGradients, make_private_compatible

CLS = {
    "DenseNet121": lambda d: nets.DenseNet121(spatial_dims=d, in_channels=1, out_channels=2),
    "ResNet18": lambda d: nets.resnet18(spatial_dims=d, n_input_channels=1, num_classes=2),
    "EfficientNetBN-b0": lambda d: nets.EfficientNetBN("efficientnet-b0", spatial_dims=d, in_channels=1,
                                                       num_classes=2, pretrained=False),
    "SEResNet50": lambda d: nets.SEResNet50(spatial_dims=d, in_channels=1, num_classes=2),
}
SEG = {
    "UNet": lambda d: nets.UNet(d, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2),
    "BasicUNet": lambda d: nets.BasicUNet(d, 1, 2),
    "SegResNet": lambda d: nets.SegResNet(d, init_filters=16, in_channels=1, out_channels=2),
    "DynUNet": lambda d: nets.DynUNet(d, 1, 2, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[16, 32, 64, 128]),
    "UNETR": lambda d: nets.UNETR(1, 2, (32,) * d, feature_size=16, hidden_size=384, mlp_dim=768, num_heads=6,
                                  spatial_dims=d),
}


def _batch(kind, d, batch, size, device):
    x = torch.randn(batch, 1, *(size,) * d, device=device)
    y = torch.randint(0, 2, (batch,), device=device) if kind == "cls" else \
        torch.randint(0, 2, (batch, 1, *(size,) * d), device=device)
    return x, y


def _loss(kind):
    if kind == "cls":
        return nn.CrossEntropyLoss()
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, device, warmup=1, repeats=3):
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def measure(name, build, kind, d, batch, size, device, repeats):
    torch.manual_seed(0)
    net, _ = make_private_compatible(build(d))  # same (GroupNorm) network for both, so only DP differs
    net = net.to(device).train()
    loss = _loss(kind)
    x, y = _batch(kind, d, batch, size, device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def plain_step():
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()

    t_plain = time_steps(plain_step, device, repeats=repeats)
    dp_opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=batch)
    sampler = PerSampleGradients(net, loss)
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]

    def dp_step():
        dp_opt.zero_grad()
        grads, _, _ = sampler(x, y)
        for n, p in params:
            p.grad_sample = grads[n]
        dp_opt.step()

    t_dp = time_steps(dp_step, device, repeats=repeats)
    return t_plain, t_dp, sampler.method


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="*", default=list(CLS) + list(SEG))
    ap.add_argument("--dims", nargs="*", type=int, default=[2, 3])
    ap.add_argument("--batch-2d", type=int, default=16)
    ap.add_argument("--batch-3d", type=int, default=2)
    ap.add_argument("--size-2d", type=int, default=64)
    ap.add_argument("--size-3d", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    import monai
    import opacus

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {dev_name}; torch {torch.__version__}, monai {monai.__version__}, opacus {opacus.__version__}")
    print("per-sample gradients: monai_dp whole-network torch.func (method chosen automatically); "
          "same GroupNorm network for both; cross-entropy for classification, DiceCE for segmentation")
    print()
    print("| network | dims | input | batch | per-sample method | non-DP s/step | DP s/step | DP / non-DP |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.networks:
        kind, build = ("cls", CLS[name]) if name in CLS else ("seg", SEG[name])
        for d in args.dims:
            batch = args.batch_2d if d == 2 else args.batch_3d
            size = args.size_2d if d == 2 else args.size_3d
            if name == "UNETR":
                size = 32
            try:
                t_plain, t_dp, method = measure(name, build, kind, d, batch, size, device, args.repeats)
                print(f"| {name} | {d}D | {size}^{d} | {batch} | {method} | {t_plain:.3f} | {t_dp:.3f} | "
                      f"{t_dp / t_plain:.2f} |", flush=True)
            except Exception as e:  # noqa: BLE001 - a benchmark reports failures as rows
                print(f"| {name} | {d}D | {size}^{d} | {batch} | - | - | - | failed: {type(e).__name__}: "
                      f"{str(e)[:60]} |", flush=True)


if __name__ == "__main__":
    main()
