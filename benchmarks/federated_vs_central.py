"""Federated DP against centralised DP on the same records and the same ε, as a markdown table.

    python benchmarks/federated_vs_central.py [--items 120] [--rounds 3] [--epsilon 8] [--skew 0.8]

One synthetic 2D classification set (``dp_classification_2d``'s generator) is split by patient across two sites,
unevenly: a patient goes to site-1 with probability ``skew`` (the generator gives every patient one record of each
class, so the split skews the sites' sizes, not their labels). Centralised: the bundle trains once on
the pooled records for ``rounds`` epochs. Federated: NVIDIA FLARE's simulator runs the same bundle at both sites
(DP-SGD, σ planned over the rounds) with FedAvg for ``rounds`` rounds of one local epoch. Both spend the same ε
per record (each record is in one site only). Both final models are scored on the generator's held-out test
patients. A small DenseNet keeps it CPU-sized (the bundle's own DenseNet121 is the same pipeline, slower). It
measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dp_classification_2d"
NETWORK = {"_target_": "DenseNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "init_features": 8,
           "growth_rate": 8, "block_config": [1, 1], "bn_size": 2, "norm": ["group", {"num_groups": 4}]}
COMMON = {"image_size": [32, 32], "batch_size": 8, "network_def#network": NETWORK}


def _split(root: Path, skew: float, seed: int) -> dict[str, Path]:
    """Site folders whose ``dataset.json`` lists a share of the pooled patients (absolute image paths)."""
    pooled = json.loads((root / "pooled" / "dataset.json").read_text())
    rng = random.Random(seed)
    by_patient: dict[str, list] = {}
    for rec in pooled["training"]:
        by_patient.setdefault(rec["patient_id"], []).append(dict(rec, image=str(root / "pooled" / rec["image"])))
    sites: dict[str, list] = {"site-1": [], "site-2": []}
    for records in by_patient.values():
        sites["site-1" if rng.random() < skew else "site-2"].extend(records)
    out = {}
    for name, records in sites.items():
        folder = root / name
        folder.mkdir()
        (folder / "dataset.json").write_text(json.dumps({"training": records}))
        out[name] = folder
    return out


def _scores(weights_file: Path, test_records: list, data_dir: Path) -> tuple[float, float]:
    """Accuracy and ROC AUC (class 1 against 0, Mann-Whitney) of a saved model on ``test_records``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), **COMMON})
    net = parser.get_parsed_content("network_def")
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) and "model" in state else state
    net.load_state_dict(state)
    net.eval()
    transform = parser.get_parsed_content("validate#preprocessing")
    probs, labels = [], [int(rec["label"]) for rec in test_records]
    with torch.no_grad():
        for rec in test_records:
            item = transform(dict(rec, image=str(data_dir / rec["image"])))
            probs.append(float(torch.softmax(net(item["image"][None]), 1)[0, 1]))
    accuracy = sum(int((p > 0.5) == bool(y)) for p, y in zip(probs, labels)) / len(labels)
    pos = [p for p, y in zip(probs, labels) if y == 1]
    neg = [p for p, y in zip(probs, labels) if y == 0]
    auc = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    return accuracy, auc


def _run(cmd: list[str], cwd: Path) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--skew", type=float, default=0.8)
    args = parser.parse_args()
    from monai_dp.data import make_synthetic_dataset

    root = Path(tempfile.mkdtemp(prefix="fl_bench_"))
    try:
        make_synthetic_dataset(root / "pooled", "classification", 2, num_items=args.items, size=32, seed=0)
        test = json.loads((root / "pooled" / "dataset.json").read_text())["test"]
        sites = _split(root, args.skew, seed=0)
        central_out = root / "central"
        central = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                        str(BUNDLE / "configs" / "train.json"), "--bundle_root", str(BUNDLE),
                        "--dataset_dir", str(root / "pooled"), "--ckpt_dir", str(central_out),
                        "--max_epochs", str(args.rounds), "--target_epsilon", str(args.epsilon),
                        *[x for k, v in COMMON.items() for x in (f"--{k}", json.dumps(v))]], root)
        site_config = {name: {"target_epsilon": args.epsilon, "dataset_id": name, "output_dir": str(root / f"{name}_out"),
                              "overrides": {**COMMON, "dataset_dir": str(folder)}} for name, folder in sites.items()}
        (root / "sites.json").write_text(json.dumps(site_config))
        federated = _run([sys.executable, "-m", "monai_dp.fl.job", "--bundle_root", str(BUNDLE), "--sites",
                          *sites, "--num_rounds", str(args.rounds), "--site_config", str(root / "sites.json"),
                          "--network_overrides", json.dumps({"network_def#network": NETWORK}),
                          "--workspace", str(root / "ws")], root)
        server = root / "ws" / "dp_fedavg" / "server" / "simulate_job"
        report = json.loads((server / "federation_report.json").read_text())
        global_model = torch.load(server / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=True)
        model_bytes = sum(t.numel() * t.element_size() for t in global_model["model"].values())
        rows = [("centralised DP (pooled records)", *_scores(central_out / "model_final.pt", test, root / "pooled"),
                 central, "-", "-"),
                ("federated DP (2 sites, FedAvg)", *_scores(server / "app_server" / "FL_global_model.pt", test,
                                                             root / "pooled"),
                 federated, report["rounds_run"], 2 * len(sites) * model_bytes)]
        eps = {s: round(v["privacy"]["epsilon"], 3) for s, v in report["sites"].items()}
        sizes = {s: len(json.loads((f / "dataset.json").read_text())["training"]) for s, f in sites.items()}
        print(f"\n{args.items} synthetic records ({len(test)} held-out test), records per site {sizes}, skew "
              f"{args.skew}, ε = {args.epsilon} per record, {args.rounds} epochs / rounds; per-site ε spent {eps}; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
        print("| setting | test accuracy | test ROC AUC | wall time (s) | rounds | bytes per round (down + up) |")
        print("|---|---|---|---|---|---|")
        for name, acc, auc, wall, rounds, nbytes in rows:
            print(f"| {name} | {acc:.3f} | {auc:.3f} | {wall:.0f} | {rounds} | {nbytes} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
