"""The audit demonstration: the same recipe without DP, with record-level DP and with patient-level DP.

    python benchmarks/audit_demo.py --out runs/audit_demo --workers 2 [--num-models 64] [--epsilon 4]

Runs ``monai-dp audit`` three times on the synthetic audit data set (patients with 1-6 look-alike records,
a few atypical patients, a small subgroup from another site) and writes ``audit_demo.md``: aggregate and
per-patient exposure against the bound each guarantee implies, and which patients (by record count) are
significantly above it. Each audit resumes if interrupted; its time is that of its models' files (first to
last), so a resumed arm still reports its training time. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

from monai_dp.__main__ import main as cli


def _minutes(folder: Path) -> float:
    models = sorted(folder.glob("model_*.npz"))
    return (max(p.stat().st_mtime for p in models) - (folder / "membership.npy").stat().st_mtime) / 60


def _row(name: str, folder: Path) -> str:
    s = json.loads((folder / "summary.json").read_text())
    with open(folder / "patients.csv") as f:
        patients = list(csv.DictReader(f))
    bound = s["bound"]["auc"] if s["bound"] else None
    sig = Counter(int(p["num_records"]) for p in patients if p.get("significantly_above_bound") == "1")
    by_k = ", ".join(f"{n}×{k}" for k, n in sorted(sig.items())) or "none"
    above = "-" if bound is None else f"{s['patients_above_bound']} / {s['patients_significantly_above_bound']} ({by_k})"
    return (f"| {name} | {s['aggregate']['auc']:.3f} | {s['aggregate']['tpr_at_fpr']['0.01']:.3f} | "
            f"{s['patient_auc']['median']:.3f} | {s['patient_auc']['max']:.3f} | "
            f"{sum(float(p['auc']) > 0.9 for p in patients)} | {'-' if bound is None else f'{bound:.3f}'} | "
            f"{above} | {_minutes(folder):.1f} min |")


def _by_records(folder: Path) -> dict[int, tuple[float, float]]:
    """By the patient's number of records: mean record AUC of atypical and of other patients, atypical count."""
    import numpy as np

    from monai_dp.audit import make_audit_dataset

    data = make_audit_dataset()  # the data set --synthetic audits
    with open(folder / "records.csv") as f:
        auc = np.asarray([float(r["auc"]) for r in csv.DictReader(f)])
    _, inverse, counts = np.unique(data["patient_ids"], return_inverse=True, return_counts=True)
    k, atypical = counts[inverse], data["metadata"]["atypical"] == "yes"
    return {int(n): (float(auc[atypical & (k == n)].mean()) if (atypical & (k == n)).any() else float("nan"),
                     float(auc[~atypical & (k == n)].mean()), int((atypical & (k == n)).sum()) // int(n))
            for n in np.unique(k)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/audit_demo")
    ap.add_argument("--num-models", type=int, default=64)
    ap.add_argument("--epsilon", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--arms", nargs="*", default=["no_dp", "record_dp", "patient_dp"])
    args = ap.parse_args()
    recipe = ["--synthetic", "--epochs", str(args.epochs), "--width", str(args.width), "--lr", str(args.lr),
              "--momentum", "0.9", "--batch-size", str(args.batch_size)]
    runs = {"no_dp": ("no DP", ["--no-dp"]),
            "record_dp": (f"record-level DP, ε = {args.epsilon:g}",
                          ["--target-epsilon", str(args.epsilon), "--privacy-unit", "record"]),
            "patient_dp": (f"patient-level DP, ε = {args.epsilon:g}",
                           ["--target-epsilon", str(args.epsilon), "--privacy-unit", "patient"])}
    rows, size, dose = [], "", {}
    for arm, (name, extra) in runs.items():
        if arm not in args.arms:
            continue
        folder = Path(args.out) / arm
        cli(["audit", "--out", str(folder), "--num-models", str(args.num_models), "--workers", str(args.workers),
             *recipe, *extra])
        rows.append(_row(name, folder))
        dose[name] = _by_records(folder)
        summary = json.loads((folder / "summary.json").read_text())
        size = f"{summary['num_patients']} patients, {summary['num_records']} records"
    table = "\n".join([f"{args.num_models} models per audit, synthetic audit data set ({size}); "
                       f"recipe: {' '.join(recipe[1:])}", "",
                       "| training | aggregate MIA AUC | aggregate TPR at FPR 1 % | median patient AUC | "
                       "max patient AUC | patients with AUC > 0.9 | AUC bound of the guarantee | patients above "
                       "the bound: by > 1 SE / significantly (their records) | time |",
                       "|---|---|---|---|---|---|---|---|---|", *rows])
    ks = sorted({k for d in dose.values() for k in d})
    table += "\n\n" + "\n".join([
        "Mean record AUC of atypical patients (label flipped, rare device) and, in brackets, of the others, by "
        "the patient's number of records:", "",
        "| training | " + " | ".join(f"{k} record{'s' if k > 1 else ''} ({next(iter(dose.values()))[k][2]} atypical)"
                                     for k in ks) + " |",
        "|---|" + "---|" * len(ks),
        *[f"| {name} | " + " | ".join(("-" if d[k][2] == 0 else f"{d[k][0]:.3f}") + f" ({d[k][1]:.3f})" for k in ks)
          + " |" for name, d in dose.items()]])
    (Path(args.out) / "audit_demo.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
