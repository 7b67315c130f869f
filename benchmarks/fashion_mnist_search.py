"""Recipe search for Fashion-MNIST on a validation split carved out of the training set (never the test set).

The bundle's Fashion-MNIST recipe (``bundles/dp_classification_2d/configs/fashion_mnist.json``) trains a
GroupNorm + linear head on fixed scattering features. Trying a recipe through the bundle costs 10-15 CPU minutes;
this script runs the same DP-SGD on the same head directly on cached features (4 to 8 minutes per recipe
measured on 2 shared cores), so that choices (batch, epochs, learning rate, clip norm, averaging, flips, feature transforms, a small
CNN head) can be compared on a validation split. It measures; it asserts nothing and releases no model.

Per recipe: Poisson sampling at rate B / N, per-example clipping at C, Gaussian noise σC calibrated with the
package's PRV calibration for the target ε at δ = 1e-5, SGD with momentum on the noisy mean (divided by the
expected batch B, as the package does), and an average of the iterates with the warm-up of
``EMAWeightsHandler``. The per-example gradient norms of the linear head are computed in closed form (GroupNorm
affine + linear); ``tests/benchmarks/test_fashion_mnist_search.py`` checks them against per-example gradients
from ``torch.func``. The CNN head uses ``torch.func`` per-example gradients directly.

What the search itself costs: choosing among recipes by looking at validation accuracy depends on the private
training images and is not covered by the ε of the chosen run (as in the published results compared against).

    python benchmarks/fashion_mnist_search.py --out runs/fashion_mnist_search \
        --grid '[{"lr": 8}, {"lr": 16}, {"batch": 8192, "epochs": 60}]'

Recipe keys (defaults are the bundle's recipe): ``epsilon`` (3), ``batch`` (4096), ``epochs`` (40), ``lr`` (8),
``momentum`` (0.9), ``clip`` (0.1), ``ema_decay`` (0.99), ``ema_start`` (fraction of the steps, 0.2 ≈ the
bundle's step 120 of 560), ``flip`` (``"none"``; ``"average"``: features of the image and of its mirror image
averaged; ``"augment"``: a random one of the two each time a record is drawn), ``standardize`` (``false``;
``true``: every feature standardised with the training split's mean and spread after GroupNorm's normalisation, a
non-private upper bound on what privately estimated statistics could give), ``transform`` (``"none"``,
``"sqrt"``, ``"log"``: applied to the scattering coefficients before everything else), ``label_smoothing`` (0),
``head`` (``"linear"``, ``"cnn<channels>"`` or ``"projected"``: the package's ``ProjectedFeatureClassifier``, its
statistics released with σ = ``statistics_sigma`` (8) and composed into the calibration, ``components`` (1000)
directions, ``ridge`` (0.1)), ``seed`` (0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

GROUPS, CHANNELS, SPATIAL = 27, 81, 49  # scattering J = 2, L = 8 of 28 x 28 images: 81 channels of 7 x 7
DEFAULTS = {"epsilon": 3.0, "batch": 4096, "epochs": 40, "lr": 8.0, "momentum": 0.9, "clip": 0.1, "ema_decay": 0.99,
            "ema_start": 0.2, "flip": "none", "standardize": False, "transform": "none", "label_smoothing": 0.0,
            "head": "linear", "seed": 0, "statistics_sigma": 8.0, "components": 1000, "ridge": 0.1}


def scattering_features(images: np.ndarray, cache: Path) -> np.ndarray:
    """Scattering coefficients (N, 81, 7, 7) of uint8 images, computed once per set of images into ``cache``."""
    import hashlib

    from monai_dp.networks import WaveletScattering2D

    ext = WaveletScattering2D([28, 28], J=2, L=8).eval()
    path = cache / f"scattering-{hashlib.sha256(images.tobytes()).hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path)
    out = []
    with torch.no_grad():
        for b in range(0, len(images), 2000):
            out.append(ext(torch.from_numpy(images[b:b + 2000].astype(np.float32) / 255.0)[:, None]).numpy())
    feats = np.concatenate(out)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    return feats


def group_normalise(feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm without affine (what ``nn.GroupNorm(27, 81)`` computes before its weight and bias): (N, 81, 49)."""
    t = feats.reshape(len(feats), GROUPS, -1)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + eps)
    return t.reshape(len(feats), CHANNELS, SPATIAL)


def linear_head_norms(params: dict, views: list[torch.Tensor], y: torch.Tensor, label_smoothing: float = 0.0):
    """Per-example gradient norms of the mean cross-entropy over ``views`` of each example, for the head
    ``logits = W · flatten(g ⊙ x + b) + c`` (x: group-normalised features (n, 81, 49)), and the logits per view.

    With ``s_v`` the gradient of the loss of view ``v`` with respect to its logits (divided by the number of
    views) and ``h_v`` the flattened activations: ``∂W = Σ_v s_v h_vᵀ``, ``∂c = Σ_v s_v``, so
    ``|∂W|² + |∂c|² = Σ_{v,w} (s_v·s_w)(h_v·h_w + 1)``; ``∂g = Σ_v Σ_pixels (Wᵀ s_v) ⊙ x_v``, ``∂b = Σ_v Σ_pixels Wᵀ s_v``.
    """
    n, nv = len(y), len(views)
    hs = [(x * params["g"][None, :, None] + params["b"][None, :, None]).reshape(n, -1) for x in views]
    logits = [h @ params["W"].T + params["c"] for h in hs]
    with torch.no_grad():
        classes = params["W"].shape[0]
        ss = []
        for lg in logits:
            s = torch.softmax(lg, 1) - label_smoothing / classes
            s[torch.arange(n), y] -= 1.0 - label_smoothing
            ss.append(s / nv)
        sq = torch.zeros(n)
        dg = torch.zeros(n, CHANNELS)
        db = torch.zeros(n, CHANNELS)
        for a in range(nv):
            for b in range(nv):
                sq += (ss[a] * ss[b]).sum(1) * ((hs[a] * hs[b]).sum(1) + 1.0)
            back = (ss[a] @ params["W"]).view(n, CHANNELS, -1)
            dg += (back * views[a]).sum(2)
            db += back.sum(2)
        sq += dg.pow(2).sum(1) + db.pow(2).sum(1)
    return sq.sqrt(), logits


def projected_head_norms(params: dict, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradient norms of the cross-entropy of ``logits = W z + c`` (the linear layer of
    ``ProjectedFeatureClassifier`` on its projections ``z``), and the gradients ``s`` with respect to the logits:
    ``∂W = s zᵀ``, ``∂c = s``, so the norm is ``|s| · sqrt(|z|² + 1)``."""
    s = torch.softmax(z @ params["W"].T + params["c"], 1)
    s[torch.arange(len(y)), y] -= 1.0
    return s.norm(dim=1) * torch.sqrt(z.pow(2).sum(1) + 1.0), s


def cnn_head(channels: int) -> nn.Module:
    """GroupNorm affine over the (already normalised) scattering channels, one 3x3 convolution, GroupNorm, tanh,
    2x2 max-pooling, linear (Tramèr & Boneh's ScatterNet + CNN, scaled down)."""
    return nn.Sequential(nn.GroupNorm(GROUPS, CHANNELS), nn.Conv2d(CHANNELS, channels, 3, padding=1),
                         nn.GroupNorm(4, channels), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 9, 10))


def run(recipe: dict, data: dict) -> dict:
    from monai_dp.privacy.calibration import calibrate_noise_multiplier

    r = {**DEFAULTS, **recipe}
    unknown = set(recipe) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    gen = torch.Generator().manual_seed(int(r["seed"]) + 100)
    torch.manual_seed(int(r["seed"]))
    x_tr, x_va, y_tr, y_va = data["train"], data["val"], data["y_train"], data["y_val"]
    flip_tr, flip_va = data.get("train_flip"), data.get("val_flip")
    if r["flip"] == "average":
        x_tr, x_va = (x_tr + flip_tr) / 2, (x_va + flip_va) / 2
    n = len(x_tr)
    q = r["batch"] / n
    steps = int(r["epochs"] / q)
    head = r["head"]
    prior = ((float(r["statistics_sigma"]), 1.0, 1),) if head == "projected" else ()
    sigma = calibrate_noise_multiplier(r["epsilon"], 1e-5, q, steps, accountant="prv",
                                       prior_history=prior) if r["epsilon"] else 0.0
    projection = None
    if head == "projected" and r["flip"] == "augment":
        raise ValueError("flip='augment' draws unprojected features; use 'none' or 'average' with head='projected'")
    if head == "projected":  # the package's head: its statistics released privately, then a linear layer on them
        from monai_dp.networks import ProjectedFeatureClassifier

        projection = ProjectedFeatureClassifier((CHANNELS, 7, 7), 10, GROUPS, int(r["components"]), float(r["ridge"]))
        projection.release_statistics(x_tr.view(n, CHANNELS, 7, 7), noise_multiplier=float(r["statistics_sigma"]),
                                      noise_seed=int(r["seed"]) + 200)
        with torch.no_grad():
            x_tr, x_va = (torch.cat([projection.project(x[i:i + 4096].view(-1, CHANNELS, 7, 7))
                                     for i in range(0, len(x), 4096)]) for x in (x_tr, x_va))
        p = {"W": projection.linear.weight.detach().clone(), "c": projection.linear.bias.detach().clone()}
        model = None
    elif head == "linear":
        lin = nn.Linear(CHANNELS * SPATIAL, 10)
        p = {"g": torch.ones(CHANNELS), "b": torch.zeros(CHANNELS), "W": lin.weight.detach().clone(),
             "c": lin.bias.detach().clone()}
        model = None
    elif head.startswith("cnn"):
        from torch.func import functional_call, grad, vmap

        model = cnn_head(int(head[3:] or 32))
        p = {k: v.detach().clone() for k, v in model.named_parameters()}

        def loss_one(pp, x, y):
            return nn.functional.cross_entropy(functional_call(model, pp, (x[None].view(1, CHANNELS, 7, 7),)), y[None],
                                               label_smoothing=r["label_smoothing"])

        per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    else:
        raise ValueError(f"head must be 'linear', 'projected' or 'cnn<channels>', got {head!r}")
    momentum_buf = {k: torch.zeros_like(v) for k, v in p.items()}
    average = {k: v.clone() for k, v in p.items()}
    start = int(r["ema_start"] * steps)
    clip = r["clip"]
    t0, cpu0, clipped = time.time(), time.process_time(), []
    for step in range(steps):
        idx = torch.nonzero(torch.rand(n, generator=gen) < q).squeeze(1)
        y = y_tr[idx]
        if r["flip"] == "augment":
            pick = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(pick[:, None, None], flip_tr[idx], x_tr[idx])
        else:
            x = x_tr[idx]
        if projection is not None:
            norms, s = projected_head_norms(p, x, y)
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            sf = s * factor[:, None]
            total = {"W": sf.T @ x, "c": sf.sum(0)}
        elif model is None:
            pr = {k: v.clone().requires_grad_(True) for k, v in p.items()}
            norms, logits = linear_head_norms(pr, [x], y, r["label_smoothing"])
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            loss = nn.functional.cross_entropy(logits[0], y, reduction="none", label_smoothing=r["label_smoothing"])
            total = dict(zip(pr, torch.autograd.grad((loss * factor).sum(), list(pr.values()))))
        else:
            total = {k: torch.zeros_like(v) for k, v in p.items()}
            norms_all = []
            for c0 in range(0, len(idx), 512):
                gs = per_example(p, x[c0:c0 + 512], y[c0:c0 + 512])
                norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in gs.values()))
                factor = (clip / (norms + 1e-6)).clamp(max=1.0)
                for k in total:
                    total[k] += torch.einsum("n,n...->...", factor, gs[k])
                norms_all.append(norms)
            norms = torch.cat(norms_all) if norms_all else torch.zeros(0)
        clipped.append(float((norms > clip).float().mean()) if len(norms) else 0.0)
        with torch.no_grad():
            for k in p:
                g = (total[k] + sigma * clip * torch.randn(p[k].shape, generator=gen)) / r["batch"]
                momentum_buf[k] = r["momentum"] * momentum_buf[k] + g
                p[k] = p[k] - r["lr"] * momentum_buf[k]
            m = step + 1 - start  # the warm-up of EMAWeightsHandler: min(decay, (1 + m) / (10 + m)) after start
            decay = min(r["ema_decay"], (1 + m) / (10 + m)) if m > 0 else 0.0
            for k in average:
                average[k] = decay * average[k] + (1 - decay) * p[k]

    def accuracy(pp: dict, x: torch.Tensor) -> float:
        with torch.no_grad():
            if projection is not None:
                out = x @ pp["W"].T + pp["c"]
            elif model is None:
                out = linear_head_norms(pp, [x], y_va)[1][0]
            else:
                from torch.func import functional_call

                out = functional_call(model, pp, (x.view(len(x), CHANNELS, 7, 7),))
        return 100.0 * float((out.argmax(1) == y_va).float().mean())

    return {"recipe": {k: r[k] for k in DEFAULTS}, "sigma": round(sigma, 4), "steps": steps,
            "val_last": round(accuracy(p, x_va), 2), "val_average": round(accuracy(average, x_va), 2),
            "clipped_fraction_last_epoch": round(float(np.mean(clipped[-max(1, int(1 / q)):])), 3),
            "minutes": round((time.time() - t0) / 60, 1), "cpu_minutes": round((time.process_time() - cpu0) / 60, 1)}


def load_data(src: Path, cache: Path, n_val: int, split_seed: int, transform: str, standardize: bool,
              flips: bool) -> dict:
    from fashion_mnist import read_idx

    images = read_idx(src / "train-images-idx3-ubyte.gz")
    labels = torch.from_numpy(read_idx(src / "train-labels-idx1-ubyte.gz").astype(np.int64))
    perm = np.random.default_rng(split_seed).permutation(len(images))
    va, tr = torch.from_numpy(perm[:n_val]), torch.from_numpy(perm[n_val:])
    fn = {"none": lambda a: a, "sqrt": np.sqrt, "log": lambda a: np.log(a + 1e-3)}[transform]

    def prepared(imgs: np.ndarray) -> torch.Tensor:
        return group_normalise(torch.from_numpy(fn(np.maximum(scattering_features(imgs, cache), 0)).astype(np.float32)))

    x = prepared(images)
    data = {"train": x[tr], "val": x[va], "y_train": labels[tr], "y_val": labels[va]}
    if flips:
        xf = prepared(np.ascontiguousarray(images[:, :, ::-1]))
        data["train_flip"], data["val_flip"] = xf[tr], xf[va]
    if standardize:
        mean, spread = data["train"].mean(0, keepdim=True), data["train"].std(0, keepdim=True) + 1e-3
        for k in [k for k in data if not k.startswith("y_")]:
            data[k] = (data[k] - mean) / spread
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="folder of the Fashion-MNIST idx files")
    ap.add_argument("--out", default="runs/fashion_mnist_search")
    ap.add_argument("--grid", default="[{}]", help="JSON list of recipes (keys: see the module docstring)")
    ap.add_argument("--n-val", type=int, default=10000, help="validation images carved out of the 60k training set")
    ap.add_argument("--split-seed", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    grid = [{**DEFAULTS, **g} for g in json.loads(args.grid)]
    results = []
    loaded: dict = {}
    for recipe in grid:
        key = (recipe["transform"], bool(recipe["standardize"]), recipe["flip"] != "none")
        if key not in loaded:
            loaded.clear()
            loaded[key] = load_data(Path(args.data), out / "feature_cache", args.n_val, args.split_seed, *key)
        res = run({k: v for k, v in recipe.items()}, loaded[key])
        print(json.dumps(res), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
        results.append(res)
    print(write_table(out, results, args.n_val))


def write_table(out: Path, results: list[dict], n_val: int) -> str:
    lines = [(f"validation split: {n_val} of the 60,000 training images; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads"), "",
             ("| recipe (changes from the bundle's) | σ | steps | validation: last iterate | validation: average "
              "| clipped (last epoch) | minutes (CPU) |"), "|---|---|---|---|---|---|---|"]
    for r in results:
        changed = {k: v for k, v in r["recipe"].items() if DEFAULTS[k] != v} or "bundle recipe"
        lines.append(f"| {changed} | {r['sigma']} | {r['steps']} | {r['val_last']:.2f}% | {r['val_average']:.2f}% | "
                     f"{r['clipped_fraction_last_epoch']} | {r['minutes']} ({r['cpu_minutes']}) |")
    table = "\n".join(lines)
    (out / "search.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
