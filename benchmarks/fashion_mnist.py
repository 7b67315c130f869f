"""Fashion-MNIST with the dp_classification_2d bundle: DP (ε = 3, δ = 1e-5) against the same network without DP.

Reads the idx files of Fashion-MNIST (Debian's ``dataset-fashion-mnist`` puts them in
/usr/share/datasets/fashion-mnist), writes them as a MedMNIST-format .npz (59k train, 1k validation
from the training set, the 10k test set), trains the bundle with its Fashion-MNIST recipe
(``configs/fashion_mnist.json`` over ``configs/train.json``) through MONAI's ``ConfigWorkflow``,
evaluates the best-validation checkpoint on the test set with ``configs/evaluate.json``, does the same
with DP switched off, and writes a markdown table. It measures; it asserts nothing.

    python benchmarks/fashion_mnist.py --out runs/fashion_mnist
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dp_classification_2d"


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
    if not dp:  # the same trainer arguments, minus everything SupervisedTrainer does not take
        import inspect

        from monai.engines import SupervisedTrainer

        accepted = set(inspect.signature(SupervisedTrainer.__init__).parameters)
        trainer = config["train"]["trainer"]
        trainer["_target_"] = "SupervisedTrainer"
        for k in [k for k in trainer if k != "_target_" and k not in accepted]:
            trainer.pop(k)
        config["train"]["handlers"] = [h for h in config["train"]["handlers"]
                                       if "PrivacyReportHandler" not in h["_target_"]]
    import json

    dest.write_text(json.dumps(config, indent=2))
    return str(dest)


def run_recipe(name: str, root: Path, npz: Path, dp: bool, overrides: dict) -> dict:
    from monai.bundle import ConfigWorkflow

    bundle = root / name
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(BUNDLE, bundle)
    files = [bundle / "configs" / "train.json", bundle / "configs" / "fashion_mnist.json"]
    common = {"bundle_root": str(bundle), "dataset_dir": str(npz), **overrides}
    start = time.time()
    wf = ConfigWorkflow(config_file=_config(files, common, dp, bundle / "run_train.json"), workflow_type="train")
    wf.initialize()
    wf.run()
    train_s = time.time() - start
    trainer = wf.parser.get_parsed_content("train#trainer")
    epsilon = trainer.get_epsilon() if dp else float("inf")
    steps = trainer.dp_steps if dp else trainer.state.iteration
    ev = ConfigWorkflow(config_file=_config(files + [bundle / "configs" / "evaluate.json"], common, dp,
                                            bundle / "run_evaluate.json"), workflow_type="eval")
    ev.initialize()
    ev.run()
    rows = list(csv.reader(open(bundle / "eval" / "metrics.csv")))
    acc = float(dict((r[0], r[1]) for r in rows if len(r) >= 2)["val_accuracy"])
    return {"name": name, "dp": dp, "test_accuracy": acc, "epsilon": epsilon, "steps": steps, "train_seconds": train_s,
            "sigma": trainer.privacy.noise_multiplier if dp else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default="runs/fashion_mnist")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's max_epochs (DP run)")
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
    results = []
    dp_over = {"seed": args.seed}
    if args.epochs:
        dp_over["max_epochs"] = args.epochs
    results.append(run_recipe("dp", out, npz, True, dp_over))
    if not args.skip_nondp:
        results.append(run_recipe("non_dp", out, npz, False, {"seed": args.seed, "max_epochs": args.nondp_epochs,
                                                               "learning_rate": args.nondp_lr,
                                                               "batch_size": args.nondp_batch}))
    import monai
    import opacus

    lines = [
        f"device: CPU, {torch.get_num_threads()} threads; torch {torch.__version__}, monai {monai.__version__}, "
        f"opacus {opacus.__version__}; recipe: bundles/dp_classification_2d/configs/fashion_mnist.json",
        "",
        "| run | test accuracy | ε (δ = 1e-5) | σ | steps | training time |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        eps = f"{r['epsilon']:.2f}" if r["dp"] else "∞ (no DP)"
        sigma = f"{r['sigma']:.3f}" if r["sigma"] else "-"
        lines.append(f"| {r['name']} | {100 * r['test_accuracy']:.2f}% | {eps} | {sigma} | {r['steps']} | "
                     f"{r['train_seconds'] / 60:.1f} min |")
    table = "\n".join(lines)
    (out / "fashion_mnist.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
