"""What the noise of one DP step costs, per-tensor and flat draw, plain and in ``secure_mode``, as a markdown table.

    python benchmarks/noise_cost.py [--device cpu|cuda] [--repeats 7]

For the parameters of the bundles' networks (built from each bundle's configs/train.json, as in throughput.py) and
of DenseNet121: seconds to add the Gaussian noise of one step with the trainer's DP optimizer
(``PrivateNoiseDPOptimizer.add_noise``), with one draw per parameter tensor (``flat_noise = False``, Opacus' way)
and with one flat draw over all parameters (``flat_noise = True``, the default); with a private torch generator
seeded once from the OS (default) and in ``secure_mode`` (AES-256-CTR stream rekeyed from ``os.urandom`` before
every step, Box-Muller in float64, four draws summed per coordinate). Median wall time and median process CPU time
(all threads) of ``--repeats`` calls of each, per-tensor and flat alternated: on a shared machine the CPU time is
the steadier number. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from throughput import BUNDLES, bundle_network


def _networks():
    from monai.networks.nets import DenseNet121

    from monai_dp.networks import make_private_compatible

    for bundle in BUNDLES:
        yield bundle, make_private_compatible(bundle_network(bundle))[0]
    yield "DenseNet121 (2D, model-zoo scale)", DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)


def _noise_seconds(params, secure: bool, device: str, repeats: int) -> dict:
    """Median wall and CPU seconds of one ``add_noise``, per-tensor (``False``) and flat (``True``), alternated."""
    from monai_dp.engines.optimizer import PrivateNoiseDPOptimizer
    from monai_dp.utils.randomness import SecureGaussian, private_generator

    generator = SecureGaussian() if secure else private_generator(device)
    opt = PrivateNoiseDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
                                  expected_batch_size=1, generator=generator, secure_mode=secure)
    times = {False: ([], []), True: ([], [])}
    for i in range(2 * (repeats + 1)):  # alternated, so that a change of load hits both; one warm-up call each
        opt.flat_noise = flat = bool(i % 2)
        for p in params:
            p.summed_grad = torch.zeros_like(p)
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.add_noise()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times[flat][0].append(time.perf_counter() - start)
            times[flat][1].append(time.process_time() - start_cpu)
    return {flat: (statistics.median(w), statistics.median(c)) for flat, (w, c) in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} calls, wall s (CPU s)\n")
    print("| network | parameters | tensors | per-tensor, plain | flat, plain | per-tensor, secure_mode "
          "| flat, secure_mode |")
    print("|---|---|---|---|---|---|---|")
    for name, net in _networks():
        params = [p for p in net.to(args.device).parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        cells = []
        for secure in (False, True):
            result = _noise_seconds(params, secure, args.device, args.repeats)
            cells += [f"{result[flat][0]:.4f} ({result[flat][1]:.4f})" for flat in (False, True)]
        print(f"| {name} | {n / 1e6:.2f} M | {len(params)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
