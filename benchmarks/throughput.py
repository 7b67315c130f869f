"""Time per optimizer step and peak memory of DP training against non-private training, per bundle network.

For each bundle's network, built from the bundle's own configs/train.json (``network_def#network``), and four
larger networks of model-zoo scale (after ``make_private_compatible``, so every method trains the same
GroupNorm network), one run measures: non-private SGD, DP with materialised per-sample gradients
(``grad_sample_mode="per_sample"``), DP with mixed ghost clipping (``"ghost"``, the default where
supported), Opacus' own hooks for reference, and the bf16-autocast and channels_last variants. The
DP steps are the trainer's: clipped sum, then Opacus' ``DPOptimizer`` adds the noise. Same physical
batch for all. It measures and writes a markdown table; it asserts nothing.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` per configuration (all in one process); on CPU each
configuration runs in a fresh process and the table shows the growth of peak RSS during training
above the RSS after building the network and batch (the libraries themselves are not counted).

    python benchmarks/throughput.py --out throughput.md            # CPU: 2D at 64^2, 3D at 32^3
    python benchmarks/throughput.py --sizes-2d 224 --sizes-3d 96   # e.g. on a GPU
    python benchmarks/throughput.py --noise per-tensor             # the noise drawn per parameter tensor
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from monai.networks import nets
from step_time import _loss, _sync  # the same loss per task and CUDA sync as step_time.py

BUNDLES_DIR = Path(__file__).resolve().parent.parent / "bundles"
BUNDLES = ("dp_classification_2d", "dp_classification_3d", "dp_segmentation_2d", "dp_segmentation_3d")


def bundle_network(bundle: str, bundles_dir: Path | str = BUNDLES_DIR) -> torch.nn.Module:
    """The network that ``bundle``'s configs/train.json builds (``network_def#network``, before conversion)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundles_dir) / bundle / "configs" / "train.json"))
    return parser.get_parsed_content("network_def#network")


def _bundle_entry(bundle: str, bundles_dir: Path | str = BUNDLES_DIR) -> tuple[str, tuple]:
    """``(label, (builder, spatial dims, task))`` of ``bundle``'s network, read from its train.json."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundles_dir) / bundle / "configs" / "train.json"))
    d = int(parser.get_parsed_content("network_def#network#spatial_dims"))
    target = parser["network_def"]["network"]["_target_"].rsplit(".", 1)[-1]
    task = "cls" if "classification" in bundle else "seg"
    return f"{target}-{d}D ({bundle})", (lambda: bundle_network(bundle, bundles_dir), d, task)


NETWORKS = dict(_bundle_entry(b) for b in BUNDLES)  # name: (builder, spatial dims, task); the bundles' networks
NETWORKS.update({  # larger networks of the size the model zoo trains (the GPU targets are about these)
    "DenseNet121-2D (model-zoo scale)": (lambda: nets.DenseNet121(
        spatial_dims=2, in_channels=1, out_channels=2, norm=("group", {"num_groups": 8})), 2, "cls"),
    "ResNet-3D 32-256 (model-zoo scale)": (lambda: nets.ResNet(
        "basic", [1, 1, 1, 1], [32, 64, 128, 256], spatial_dims=3, n_input_channels=1, num_classes=2,
        norm=("group", {"num_groups": 8})), 3, "cls"),
    "UNet-2D 16-128 (model-zoo scale)": (lambda: nets.UNet(
        2, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=2, norm="instance"), 2, "seg"),
    "SegResNet-3D (model-zoo scale)": (lambda: nets.SegResNet(
        3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 2, 2), blocks_up=(1, 1),
        norm=("group", {"num_groups": 8})), 3, "seg"),
})
METHODS = ("non-DP", "per-sample", "ghost", "opacus-hooks", "non-DP bf16", "ghost bf16", "non-DP channels_last",
           "ghost channels_last")


FLAT_NOISE = {"value": True}  # the optimizer's ``flat_noise`` (``--noise``)


def _dp_optimizer(net, batch):
    from monai_dp.engines.optimizer import PrivateNoiseDPOptimizer as DPOptimizer  # Opacus' DPOptimizer, as the trainer uses it
    from monai_dp.utils.randomness import private_generator

    opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=1e-4), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=batch, generator=private_generator(next(net.parameters()).device))
    opt.flat_noise = FLAT_NOISE["value"]
    return opt


def _step_fn(method, net, loss, x, y):
    """One optimizer step of ``method`` on the batch ``(x, y)``."""
    batch, amp = x.shape[0], torch.bfloat16 if "bf16" in method else None
    ctx = torch.autocast(x.device.type, dtype=amp) if amp is not None else nullcontext()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if method.startswith("non-DP"):
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)

        def step():
            opt.zero_grad()
            with ctx:
                out = loss(net(x), y)
            out.backward()
            opt.step()
        return step
    opt = _dp_optimizer(net, batch)
    if method == "opacus-hooks":
        from opacus import GradSampleModule

        gsm = GradSampleModule(net)
        opt = _dp_optimizer(gsm, batch)

        def step():
            opt.zero_grad()
            loss(gsm(x), y).backward()
            opt.step()
        return step
    if method.startswith("per-sample"):
        from monai_dp.networks import PerSampleGradients

        sampler = PerSampleGradients(net, loss)

        def step():
            opt.zero_grad()
            grads, _, _ = sampler(x, y, amp_dtype=amp)
            for n, p in params:
                p.grad_sample = grads[n]
            opt.step()
        return step
    from monai_dp.networks import GhostClipping

    ghost = GhostClipping(net, loss)

    def step():  # as DPSupervisedTrainer._ghost_sums: the clipped sum, then Opacus adds the noise
        opt.zero_grad()
        summed, _, _, _ = ghost(x, y, None, None, opt.max_grad_norm, amp)
        for n, p in params:
            p.summed_grad = summed[n]
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        opt.step()
    return step


def measure(network, method, size, batch, device, warmup, repeats) -> dict:
    """Seconds per step and memory of one configuration (in this process)."""
    from monai_dp.networks import make_private_compatible

    build, d, task = NETWORKS[network]
    if "channels_last" in method and d != 2:
        return {"skip": "2D only"}
    torch.manual_seed(0)
    net = make_private_compatible(build())[0].to(device).train()
    x = torch.randn(batch, 1, *(size,) * d, device=device)
    y = torch.randint(0, 2, (batch,), device=device) if task == "cls" else \
        torch.randint(0, 2, (batch, 1, *(size,) * d), device=device)
    if "channels_last" in method:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    try:
        step = _step_fn(method, net, _loss(task), x, y)
        _sync(device)
        setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(warmup):
            step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync(device)
    except Exception as e:  # noqa: BLE001 - a method that cannot train this network is reported, not fatal
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"}
    out = {"s_per_step": (time.perf_counter() - start) / repeats}
    if device.type == "cuda":
        out["mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        out["mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - setup
    return out


def _run(args, network, method, size, batch) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":  # one process: peak memory is reset per configuration
        r = measure(network, method, size, batch, device, args.warmup, args.repeats)
        gc.collect()
        torch.cuda.empty_cache()
        return r
    cmd = [sys.executable, __file__, "--child", json.dumps([network, method, size, batch, args.device, args.warmup,
                                                            args.repeats, args.noise])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout} s"}
    if proc.returncode != 0:
        return {"error": ((proc.stderr.strip().splitlines() or ["?"])[-1])[:90]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(args) -> str:
    import monai
    import opacus

    device = torch.device(args.device)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    mem = ("CUDA max_memory_allocated during the steps above what was allocated before (MiB)"
           if device.type == "cuda" else "growth of peak RSS during the steps, fresh process per row (MiB)")
    lines = [f"device: {dev}; torch {torch.__version__}, monai {monai.__version__}, opacus {opacus.__version__}; "
             f"{args.warmup} warm-up + {args.repeats} timed steps per row; memory: {mem}. DP: σ = 1, C = 1, "
             f"one item per row, the trainer's DP optimizer adds the noise ({args.noise} draw).", "",
             "| network | input | batch | method | s/step | × non-DP | memory | × non-DP |",
             "|---|---|---|---|---|---|---|---|"]
    for network in args.networks:
        d = NETWORKS[network][1]
        sizes = args.sizes_2d if d == 2 else args.sizes_3d
        batch = args.batch_2d if d == 2 else args.batch_3d
        for size in sizes:
            base = {}
            for method in args.methods:
                r = _run(args, network, method, size, batch)
                if "skip" in r:
                    continue
                variant = "bf16" if "bf16" in method else "channels_last" if "channels_last" in method else ""
                if method.startswith("non-DP"):
                    base[variant] = r
                    ref = base.get("")
                else:
                    ref = base.get(variant)
                if "error" in r:
                    line = f"| {network} | {size}^{d} | {batch} | {method} | failed | - | - | - | {r['error']}"
                else:
                    tr = f"{r['s_per_step'] / ref['s_per_step']:.2f}" if ref and "error" not in ref else "-"
                    mr = f"{r['mem_mib'] / ref['mem_mib']:.2f}" if ref and "error" not in ref and ref["mem_mib"] > 0 \
                        else "-"
                    line = (f"| {network} | {size}^{d} | {batch} | {method} | {r['s_per_step']:.3f} | {tr} | "
                            f"{r['mem_mib']:.0f} | {mr} |")
                print(line, flush=True)
                lines.append(line)
    lines += ["", "Ratios: DP rows against `non-DP` of the same precision and layout (bf16 against `non-DP bf16`, "
              "channels_last against `non-DP channels_last`); the non-DP variants against plain `non-DP`."]
    return "\n".join(lines)


def main():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS), metavar="NAME")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    ap.add_argument("--sizes-2d", type=int, nargs="*", default=[64, 224] if cuda else [64])
    ap.add_argument("--sizes-3d", type=int, nargs="*", default=[96] if cuda else [32])
    ap.add_argument("--batch-2d", type=int, default=32 if cuda else 16)
    ap.add_argument("--batch-3d", type=int, default=4 if cuda else 2)
    ap.add_argument("--repeats", type=int, default=5 if cuda else 2)
    ap.add_argument("--warmup", type=int, default=2 if cuda else 1)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration (CPU)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--noise", choices=["flat", "per-tensor"], default="flat",
                    help="the DP optimizer's noise draw: one flat draw (default) or one per parameter tensor")
    ap.add_argument("--out", default=None, help="write the markdown table to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        network, method, size, batch, device, warmup, repeats, noise = json.loads(args.child)
        FLAT_NOISE["value"] = noise == "flat"
        print(json.dumps(measure(network, method, size, batch, torch.device(device), warmup, repeats)))
        return
    FLAT_NOISE["value"] = args.noise == "flat"
    text = table(args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
