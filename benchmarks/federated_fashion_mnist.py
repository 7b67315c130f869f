"""Federated DP against centralised DP on Fashion-MNIST split label-non-IID across 3 sites, as a markdown table.

    python benchmarks/federated_fashion_mnist.py --data <folder with the Fashion-MNIST idx .gz files> \
        [--train 15000] [--rounds 10] [--local_epochs 2] [--alpha 0.5] [--split dirichlet|iid]

Both settings run the ``dp_classification_2d`` bundle's Fashion-MNIST recipe (``configs/fashion_mnist.json``:
fixed wavelet-scattering features and a linear head, DP-SGD at ε = 3, δ = 1e-5, batch 4096) on the same
``--train`` records drawn from the 60k training set (the same 1000 other training images for validation):

- centralised: the bundle trains once on the pooled records (``python -m monai.bundle run``) for rounds × local
  epochs epochs (20 with the defaults, half the recipe's 40, so that the whole benchmark fits in about 20 min on
  2 shared CPU cores);
- federated: NVIDIA FLARE's simulator (a server and one client process per site) runs the same recipe at 3
  sites, FedAvg over ``--rounds`` rounds of ``--local_epochs`` epochs (every record is used as often as
  centrally). The records are split across the sites by class: for every class, the shares of the 3 sites are
  drawn from Dirichlet(``--alpha``) (``--split iid``: a uniform random split, as a control). Each site's batch size is 4096 × its share of the records, so every site samples
  at the central sampling rate q and plans σ for the same ε = 3 over the same epochs: each record (at exactly
  one site) gets the same ε as centrally.

Both final models (the central run's last model, the federation's last global model) are scored on the 10k
test set. Also reported: wall time, rounds, bytes of the model sent per round (down and up, all sites) and the
ε each site spent. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dp_classification_2d"
CONFIGS = ["configs/train.json", "configs/fashion_mnist.json"]
SITES = ["site-1", "site-2", "site-3"]
sys.path.insert(0, str(Path(__file__).resolve().parent))
# the idx reader of the central Fashion-MNIST benchmark
from fashion_mnist import read_idx


def split_sites(labels: np.ndarray, alpha: float | None, seed: int, n_sites: int = len(SITES)) -> list[np.ndarray]:
    """Indices of each site: per class, Dirichlet(alpha) shares over the sites (``alpha=None``: uniform random)."""
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), n_sites)]
    parts: list[list[int]] = [[] for _ in range(n_sites)]
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        cuts = (np.cumsum(rng.dirichlet([alpha] * n_sites))[:-1] * len(idx)).astype(int)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=int)) for p in parts]


def write_npz(path: Path, x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
              test_x: np.ndarray, test_y: np.ndarray) -> Path:
    np.savez(path, train_images=x, train_labels=y[:, None], val_images=val_x, val_labels=val_y[:, None],
             test_images=test_x, test_labels=test_y[:, None])
    return path


def _run(cmd: list[str], cwd: Path, log: Path) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed, see {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def _parser(overrides: dict | None = None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) for f in CONFIGS])
    parser.update({"bundle_root": str(BUNDLE), **(overrides or {})})
    return parser


def test_scorer(images: np.ndarray, labels: np.ndarray):
    """A function ``weights_file -> test accuracy``; the test features are computed once."""
    from monai_dp.bundle import precompute_features

    parser = _parser()
    records = [{"image": (im[None] / np.float32(255)).astype(np.float32), "label": int(y)}
               for im, y in zip(images, labels)]
    feats = precompute_features({"test": records}, parser.get_parsed_content("feature_extractor"),
                                device="cpu")["test"]
    x = torch.from_numpy(np.stack([r["image"] for r in feats]))
    y = torch.as_tensor(labels.astype(np.int64))

    def score(weights_file: Path) -> float:
        net = _parser().get_parsed_content("network_def")
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state))
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(x[i : i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
        return float((pred == y).float().mean())

    return score


def central(root: Path, npz: Path, epochs: int, batch: int, epsilon: float, seed: int) -> tuple[Path, float]:
    out = root / "central"
    config = json.dumps([str(BUNDLE / f) for f in CONFIGS])
    wall = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", str(BUNDLE),
                 "--dataset_dir", str(npz), "--ckpt_dir", str(out), "--max_epochs", str(epochs),
                 "--target_epsilon", str(epsilon), "--seed", str(seed), "--batch_size", str(batch)], root, root / "central.log")
    return out / "model_final.pt", wall


def federated(root: Path, site_npz: dict, batches: dict, args: argparse.Namespace) -> tuple[Path, float, dict]:
    sites = {name: {"target_epsilon": args.epsilon, "dataset_id": f"fashion-mnist-{name}",
                    "ledger": str(root / name / "ledger.db"), "output_dir": str(root / name / "out"),
                    "overrides": {"dataset_dir": str(path), "batch_size": batches[name], "seed": args.seed}}
             for name, path in site_npz.items()}
    (root / "sites.json").write_text(json.dumps(sites, indent=1))
    wall = _run([sys.executable, "-m", "monai_dp.fl.job", "--bundle_root", str(BUNDLE), "--sites", *sites,
                 "--num_rounds", str(args.rounds), "--local_epochs", str(args.local_epochs),
                 "--config_file", *CONFIGS, "--site_config", str(root / "sites.json"),
                 "--workspace", str(root / "ws")], root, root / "federated.log")
    server = root / "ws" / "dp_fedavg" / "server" / "simulate_job"
    report = json.loads((server / "federation_report.json").read_text())
    return server / "app_server" / "FL_global_model.pt", wall, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with the Fashion-MNIST idx .gz files")
    ap.add_argument("--train", type=int, default=15000, help="training records drawn from the 60k (pooled)")
    ap.add_argument("--n_val", type=int, default=1000, help="other training images held out for validation")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local_epochs", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    ap.add_argument("--split", choices=["dirichlet", "iid"], default="dirichlet")
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=None, help="central batch size (default: the recipe's 4096)")
    ap.add_argument("--n_test", type=int, default=10000, help="test images scored (10k: the whole test set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip_central", action="store_true")
    ap.add_argument("--keep", default=None, help="keep the run folders (logs, models) here")
    args = ap.parse_args()
    recipe = _parser().get()
    batch = args.batch or int(recipe["batch_size"])
    epochs = args.rounds * args.local_epochs  # the central run trains as many epochs
    src = Path(args.data)
    x, y = read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz")
    perm = np.random.default_rng(args.seed).permutation(len(x))
    val, train = perm[: args.n_val], perm[args.n_val : args.n_val + args.train]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fl_fmnist_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        score = test_scorer(test_x[: args.n_test], test_y[: args.n_test])
        score_s = time.perf_counter() - start
        # the sites never read their test split; a few test images keep the .npz format complete
        pooled = write_npz(root / "pooled.npz", x[train], y[train], x[val], y[val], test_x[:10], test_y[:10])
        parts = split_sites(y[train], None if args.split == "iid" else args.alpha, args.seed)
        vals = np.array_split(val, len(SITES))
        site_npz, batches, hist = {}, {}, {}
        for name, idx, v in zip(SITES, parts, vals):
            (root / name).mkdir(exist_ok=True)
            site_npz[name] = write_npz(root / name / "data.npz", x[train][idx], y[train][idx], x[v], y[v],
                                       test_x[:10], test_y[:10])
            batches[name] = max(1, round(batch * len(idx) / len(train)))
            hist[name] = np.bincount(y[train][idx], minlength=10).tolist()
        rows = []
        if not args.skip_central:
            model, wall = central(root, pooled, epochs, batch, args.epsilon, args.seed)
            report = json.loads((root / "central" / "privacy_report.json").read_text())
            rows.append(("centralised DP (pooled records)", score(model), wall, "-", "-",
                         f"{report.get('epsilon', float('nan')):.3f}"))
        model, wall, report = federated(root, site_npz, batches, args)
        state = torch.load(model, map_location="cpu", weights_only=True)
        nbytes = sum(t.numel() * t.element_size() for t in state["model"].values())
        eps = ", ".join(f"{s}: {report['sites'][s]['privacy']['epsilon']:.3f}" for s in SITES)
        rows.append((f"federated DP (3 sites, FedAvg, {args.split}"
                     + (f" α = {args.alpha}" if args.split == "dirichlet" else "") + ")", score(model), wall,
                     report["rounds_run"], 2 * len(SITES) * nbytes, eps))
        sigma = {s: round(report["sites"][s]["privacy"]["noise_multiplier"], 4) for s in SITES}
        print(f"\nFashion-MNIST: {len(train)} training records (of 60k), {args.n_val} validation, {min(args.n_test, len(test_x))} test; "
              f"split {args.split}" + (f" (Dirichlet α = {args.alpha})" if args.split == "dirichlet" else "")
              + f", seed {args.seed}; records per class per site {hist}; batch per site {batches} (central "
              f"{batch}); σ per site {sigma}; ε = {args.epsilon}, δ = 1e-5; {args.rounds} rounds × "
              f"{args.local_epochs} local epochs against {epochs} central epochs; test features "
              f"computed once for scoring ({score_s:.0f} s, not in the wall times); "
              f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
        print("| setting | test accuracy | wall time (s) | rounds | bytes per round (down + up) | ε spent |")
        print("|---|---|---|---|---|---|")
        for name, acc, wall, rounds, nb, e in rows:
            print(f"| {name} | {100 * acc:.2f} % | {wall:.0f} | {rounds} | {nb} | {e} |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
