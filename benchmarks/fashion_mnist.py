"""Fashion-MNIST with the dp_classification_2d bundle: DP at ε ∈ --epsilons (δ = 1e-5) against the same network without DP.

Reads the idx files of Fashion-MNIST (Debian's ``dataset-fashion-mnist`` puts them in
/usr/share/datasets/fashion-mnist), writes them as a MedMNIST-format .npz (59k train, 1k validation
from the training set, the 10k test set), trains the bundle with a Fashion-MNIST recipe through MONAI's
``ConfigWorkflow`` (``--recipe projected``, the default: ``configs/fashion_mnist_projected.json`` over
``configs/fashion_mnist.json`` over ``configs/train.json``, a linear head on privately projected features;
``--recipe linear``: without the projection overlay, GroupNorm + linear),
evaluates the best-validation checkpoint on the test set with ``configs/evaluate.json``, does the same
with DP switched off (the projection's statistics then exact: their release's σ set to 1e-9), and writes a
markdown table next to the published rows. It measures; it asserts nothing.
The scattering features are computed once and kept in ``<out>/feature_cache`` for the other runs.

    python benchmarks/fashion_mnist.py --out runs/fashion_mnist --epsilons 1 2 3 8
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# Tramèr & Boneh, "Differentially Private Learning Needs Better Features (or Much More Data)", ICLR 2021,
# Fashion-MNIST at ε = 3, δ = 1e-5, no public data
PUBLISHED = [("ScatterNet + linear (Tramèr & Boneh 2021)", 3.0, 89.7), ("ScatterNet + CNN (Tramèr & Boneh 2021)", 3.0, 89.0),
             ("end-to-end CNN (Tramèr & Boneh 2021)", 3.0, 86.0)]
BUNDLE = REPO / "bundles" / "dp_classification_2d"
RECIPES = {"linear": ["train.json", "fashion_mnist.json"],
           "projected": ["train.json", "fashion_mnist.json", "fashion_mnist_projected.json"]}


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_npz(src: Path, out: Path, n_val: int, seed: int) -> Path:
    x = read_idx(src / "train-images-idx3-ubyte.gz")
    y = read_idx(src / "train-labels-idx1-ubyte.gz")
    perm = np.random.default_rng(seed).permutation(len(x))
    val, train = perm[:n_val], perm[n_val:]
    path = out / "fashionmnist.npz"
    np.savez(path, train_images=x[train], train_labels=y[train, None], val_images=x[val], val_labels=y[val, None],
             test_images=read_idx(src / "t10k-images-idx3-ubyte.gz"),
             test_labels=read_idx(src / "t10k-labels-idx1-ubyte.gz")[:, None])
    return path


def _config(files: list[Path], overrides: dict, dp: bool, dest: Path) -> str:
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files([str(f) for f in files])
    parser = ConfigParser(config)
    for k, v in overrides.items():
        parser[k] = v
    config = parser.get()
    if not dp:  # the same configs under MONAI's SupervisedTrainer (as benchmarks/bundle_defaults.py does)
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bundle_defaults import without_dp

        config = without_dp(config)
    import json

    dest.write_text(json.dumps(config, indent=2))
    return str(dest)


def run_recipe(name: str, root: Path, npz: Path, dp: bool, overrides: dict, recipe: str = "linear") -> dict:
    from monai.bundle import ConfigWorkflow

    bundle = root / name
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(BUNDLE, bundle)
    files = [bundle / "configs" / f for f in RECIPES[recipe]]
    if recipe == "projected" and not dp:
        overrides = {"statistics_noise_multiplier": 1e-9, **overrides}
    common = {"bundle_root": str(bundle), "dataset_dir": str(npz), **overrides}
    start, cpu = time.time(), time.process_time()
    wf = ConfigWorkflow(config_file=_config(files, common, dp, bundle / "run_train.json"), workflow_type="train")
    wf.initialize()
    wf.run()
    train_s, train_cpu = time.time() - start, time.process_time() - cpu
    trainer = wf.parser.get_parsed_content("train#trainer")
    epsilon = trainer.get_epsilon() if dp else float("inf")
    steps = trainer.dp_steps if dp else trainer.state.iteration
    best_val = float(wf.parser.get_parsed_content("validate#evaluator").state.best_metric)
    acc = _evaluate(files, common, dp, bundle, "test", "model.pt")
    # the last iterate, without the average, on the validation split only (how the averaging was chosen)
    last_val = _evaluate(files, common, dp, bundle, "validation", "model_final.pt")
    return {"name": name, "dp": dp, "test_accuracy": acc, "epsilon": epsilon, "steps": steps, "train_seconds": train_s,
            "train_cpu_seconds": train_cpu, "sigma": trainer.privacy.noise_multiplier if dp else None,
            "best_val": best_val, "last_val": last_val}


def _evaluate(files: list[Path], common: dict, dp: bool, bundle: Path, split: str, checkpoint: str) -> float:
    from monai.bundle import ConfigWorkflow

    out = bundle / f"eval_{split}_{Path(checkpoint).stem}"
    over = {**common, "output_dir": str(out), "validate#dataset#data": f"$@datalist['{split}']",
            "validate#handlers#0#load_path": str(bundle / "models" / checkpoint)}
    ev = ConfigWorkflow(config_file=_config(files + [bundle / "configs" / "evaluate.json"], over, dp,
                                            bundle / f"run_evaluate_{out.name}.json"), workflow_type="eval")
    ev.initialize()
    ev.run()
    with open(out / "metrics.csv") as f:
        rows = list(csv.reader(f))
    return float({r[0]: r[1] for r in rows if len(r) >= 2}["val_accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default="runs/fashion_mnist")
    ap.add_argument("--epsilons", type=float, nargs="*", default=[3.0],
                    help="target ε of the DP runs (δ = 1e-5); none: only the run without DP")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="projected",
                    help="projected: linear head on privately projected features; linear: GroupNorm + linear")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's max_epochs (DP runs)")
    ap.add_argument("--nondp-epochs", type=int, default=10)
    ap.add_argument("--nondp-lr", type=float, default=0.05)
    ap.add_argument("--nondp-batch", type=int, default=256)
    ap.add_argument("--skip-nondp", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-val", type=int, default=1000, help="validation images held out of the 60k training set")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    npz = write_npz(Path(args.data), out, n_val=args.n_val, seed=args.seed)
    results, load = [], [os.getloadavg()[0]]
    cache = {"feature_cache_dir": str((out / "feature_cache").resolve())}
    for eps in args.epsilons:
        dp_over = {"seed": args.seed, "target_epsilon": eps, **cache}
        if args.epochs:
            dp_over["max_epochs"] = args.epochs
        results.append(run_recipe(f"dp_eps{eps:g}", out, npz, True, dp_over, args.recipe))
        load.append(os.getloadavg()[0])
        write_table(out, results, load, args.recipe)
    if not args.skip_nondp:
        results.append(run_recipe("non_dp", out, npz, False, {"seed": args.seed, "max_epochs": args.nondp_epochs, **cache,
                                                               "learning_rate": args.nondp_lr,
                                                               "batch_size": args.nondp_batch}, args.recipe))
    print(write_table(out, results, load, args.recipe))


def write_table(out: Path, results: list[dict], load: list[float], recipe: str = "linear") -> str:
    import monai
    import opacus

    lines = [
        f"device: CPU, {torch.get_num_threads()} threads; torch {torch.__version__}, monai {monai.__version__}, "
        f"opacus {opacus.__version__}; recipe {recipe!r}: bundles/dp_classification_2d/configs/"
        f"{' over '.join(reversed(RECIPES[recipe]))}",
        "",
        (f"1-minute load average at the start and after each DP run: {', '.join(f'{x:.1f}' for x in load)} "
         f"(on {os.cpu_count()} cores; other work on the machine slows the wall-clock times)"),
        "",
        ("| run | test accuracy | ε (δ = 1e-5) | σ | steps | validation: averaged (best epoch) / last iterate "
         "| training time (wall) | training CPU time |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        eps = f"{r['epsilon']:.2f}" if r["dp"] else "∞ (no DP)"
        sigma = f"{r['sigma']:.3f}" if r["sigma"] else "-"
        lines.append(f"| {r['name']} | {100 * r['test_accuracy']:.2f}% | {eps} | {sigma} | {r['steps']} | "
                     f"{100 * r['best_val']:.1f}% / {100 * r['last_val']:.1f}% | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['train_cpu_seconds'] / 60:.1f} min |")
    for name, eps, acc in PUBLISHED:
        lines.append(f"| {name} | {acc:.1f}% | {eps:.2f} | - | - | - | - | - |")
    table = "\n".join(lines)
    (out / "fashion_mnist.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
