"""What the noise of one DP step costs, plain and in ``secure_mode``, as a markdown table.

    python benchmarks/noise_cost.py [--device cpu|cuda]

For the parameters of the bundles' networks (and a small classifier): seconds to add the Gaussian noise of one
step with the trainer's DP optimizer (``PrivateNoiseDPOptimizer.add_noise``), with a private torch generator seeded
once from the OS (default) and in ``secure_mode`` (AES-256-CTR stream rekeyed from ``os.urandom`` before every
step, Box-Muller in float64, four draws summed per coordinate). It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _networks():
    from monai.networks.nets import UNet, DenseNet121, ResNet, SegResNet

    yield "small classifier (2D)", torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(),
                                                       torch.nn.Linear(8 * 26 * 26, 10))
    yield "DenseNet121 (2D)", DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    yield "ResNet (3D)", ResNet("basic", [1, 1, 1, 1], [64, 128, 256, 512], spatial_dims=3, n_input_channels=1,
                                num_classes=2)
    yield "UNet (2D)", UNet(2, 1, 2, (16, 32, 64, 128), (2, 2, 2))
    yield "SegResNet (3D)", SegResNet(3, 8, 1, 2)


def _noise_seconds(params, secure: bool, device: str, repeats: int = 5) -> float:
    from monai_dp.engines.optimizer import PrivateNoiseDPOptimizer
    from monai_dp.utils.randomness import SecureGaussian, private_generator

    generator = SecureGaussian() if secure else private_generator(device)
    opt = PrivateNoiseDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
                                  expected_batch_size=1, generator=generator, secure_mode=secure)
    times = []
    for _ in range(repeats):
        for p in params:
            p.summed_grad = torch.zeros_like(p)
        start = time.perf_counter()
        opt.add_noise()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"device {args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| network | parameters | noise per step, plain (s) | secure_mode (s) | secure / plain |")
    print("|---|---|---|---|---|")
    for name, net in _networks():
        params = [p for p in net.to(args.device).parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        plain = _noise_seconds(params, False, args.device)
        secure = _noise_seconds(params, True, args.device)
        print(f"| {name} | {n / 1e6:.2f} M | {plain:.4f} | {secure:.4f} | {secure / plain:.1f} |")


if __name__ == "__main__":
    main()
