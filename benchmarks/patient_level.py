"""What patient-level protection costs: a bundle's default recipe at record and at patient level, ε ∈ {1, 3, 8}.

For each bundle this makes the bundle's own synthetic data set (the arguments its ``configs/train.json`` passes
to ``make_synthetic_dataset``, read at run time) with multi-record patients: ``records_per_patient=(1, 10)``,
each patient's number of records uniform on 1..10, the records of one patient sharing one layout (see
``monai_dp.data.make_synthetic_dataset``). Then, for every target ε and unit, it copies the bundle and runs, as
``bundle_defaults.py`` does::

    python -m monai.bundle run --config_file <bundle>/configs/train.json --bundle_root <bundle> \\
        --dataset_dir <that set> --target_epsilon <ε> --privacy_unit record|patient [--batch_size <B_p>]
    python -m monai.bundle run --config_file "['<bundle>/configs/train.json','<bundle>/configs/evaluate.json']" ...

Both units train on the same records with the same splits (whole patients in training, validation and test)
and every other setting of the recipe. The batch is kept in records: at patient level the loader's
``batch_size`` counts patients, so it is set to B_p = round(B · P / N) (B the recipe's batch size, N records and
P patients of the training split); a step then holds about B records at both levels, q = B_p / P ≈ B / N, and
the same epochs give about the same steps, the same σ and the same compute. The metric is scored by
``evaluate.json`` on the held-out test split. It writes a markdown table to ``--out/patient_level.md`` and
prints it; it measures and asserts nothing.

    python benchmarks/patient_level.py --bundles dp_segmentation_2d          # 6 runs
    python benchmarks/patient_level.py --bundles dp_classification_2d --epsilons 1 3 8
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bundle_defaults  # the runner of each bundle's default, reused as is

REPO = bundle_defaults.REPO
RECIPE_KEYS = ("batch_size", "max_epochs", "learning_rate", "max_grad_norm", "accountant", "synthetic_items",
               "synthetic_size", "max_records_per_patient")


def _parser(root: Path, **values):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "train.json"))
    parser["bundle_root"] = str(root)
    for key, value in values.items():
        parser[key] = value
    return parser


def make_patient_data(name: str, dest: Path, spans: tuple[int, int]) -> tuple[Path, dict]:
    """The bundle's synthetic set with ``records_per_patient=spans``; return its folder and the training split's
    record and patient counts. The bundle's own ``data_root`` expression is evaluated, so the set has the items,
    size, seed (and contrast) that the bundle's train.json gives, whatever they are now."""
    from monai_dp import data

    root = REPO / "bundles" / name
    original = data.make_synthetic_dataset
    data.make_synthetic_dataset = functools.partial(original, records_per_patient=spans)
    try:
        folder = Path(_parser(root, dataset_dir="", synthetic_dir=str(dest)).get_parsed_content("data_root"))
    finally:
        data.make_synthetic_dataset = original
    made = json.loads((folder / "dataset.json").read_text()).get("synthetic", {})
    if made.get("records_per_patient") != list(spans):
        raise RuntimeError(f"{name}: its data_root did not call make_synthetic_dataset; got {folder}")
    parser = _parser(root, dataset_dir=str(folder))
    training = parser.get_parsed_content("datalist")["training"]
    key = parser.get_parsed_content("patient_key")
    per_patient = Counter(r[key] for r in training)
    return folder, {"records": len(training), "patients": len(per_patient), "max_records": max(per_patient.values()),
                    "synthetic": made}


@functools.cache
def _recipe_json(name: str) -> str:
    config = json.loads((REPO / "bundles" / name / "configs" / "train.json").read_text())
    return json.dumps({k: config[k] for k in RECIPE_KEYS if k in config})


def recipe(name: str) -> dict:
    """The recipe keys of the bundle's train.json as read at the first call. Each run copies the bundle afresh,
    so a train.json edited during the benchmark is flagged in the table (``recipe_changed``)."""
    return json.loads(_recipe_json(name))


def run_one(name: str, out: Path, folder: Path, epsilon: float, unit: str, batch_size: int | None,
            extra: list[str]) -> dict:
    overrides = ["--dataset_dir", str(folder), "--target_epsilon", str(epsilon), "--privacy_unit", unit]
    if batch_size is not None:
        overrides += ["--batch_size", str(batch_size)]
    where = out / f"{unit}_eps{epsilon:g}"
    result = bundle_defaults.run_bundle(name, where, True, overrides + extra)
    report = json.loads((where / name / "dp" / "models" / "privacy_report.json").read_text())
    patient = report.get("patient_level") or {}
    used = json.loads((where / name / "dp" / "configs" / "train.json").read_text())
    result.update(recipe_changed={k: used.get(k) for k in RECIPE_KEYS if k in used} != recipe(name))
    result.update(target_epsilon=epsilon, unit=unit, batch_size=batch_size, sample_rate=report["sample_rate"],
                  num_units=report["num_units"], max_records=(report.get("patients") or {}).get("max"),
                  patient_epsilon=report["epsilon"] if unit == "patient" else patient.get("epsilon"))
    return result


def account_only(name: str, setup: dict, epsilon: float, unit: str) -> dict:
    """σ, q, steps and the ε of the patient with most records that a run would have, without training: the
    trainer's own calibration (``int(1 / q)`` Poisson steps per epoch) and the report's patient-level ε."""
    from monai_dp.handlers.privacy_report_handler import patient_level_guarantee
    from monai_dp.privacy.calibration import calibrate_noise_multiplier

    rec = setup["recipe"]
    n = setup["patients"] if unit == "patient" else setup["records"]
    q = (setup["patient_batch"] if unit == "patient" else rec["batch_size"]) / n
    steps, delta = rec["max_epochs"] * int(1 / q), min(1e-5, 1 / (10 * n))
    sigma = calibrate_noise_multiplier(epsilon, delta, q, steps, rec.get("accountant", "prv"))
    k = setup["max_records"]
    pe = epsilon if unit == "patient" else patient_level_guarantee([(sigma, q, steps)], k, delta)["epsilon"]
    return {"bundle": name, "metric": "(not trained)", "value": float("nan"), "seconds": float("nan"),
            "cpu_seconds": float("nan"), "epsilon": epsilon, "delta": delta, "steps": steps, "sigma": sigma,
            "target_epsilon": epsilon, "unit": unit, "sample_rate": q, "num_units": n, "max_records": k,
            "patient_epsilon": pe}


def table(results: list[dict], setup: dict) -> str:
    import monai
    import opacus
    import torch

    lines = [(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}, monai {monai.__version__}, "
              f"opacus {opacus.__version__}. Metric on the held-out test split (evaluate.json).")]
    for name, s in setup.items():
        lines.append(f"{name}: recipe {json.dumps(s['recipe'])}; training split {s['records']} records of "
                     f"{s['patients']} patients (synthetic {json.dumps(s['synthetic'])}); patient-level batch_size "
                     f"{s['patient_batch']} patients (≈ {s['recipe'].get('batch_size')} records).")
    results = sorted(results, key=lambda r: (r["bundle"], r["target_epsilon"], r["unit"] != "record"))
    lines += ["", ("| bundle | target ε | unit | metric | test value | ε (δ) | ε of the patient with most records "
                   "(k) | σ | q | units N | steps | minutes (wall) | CPU minutes |"), "|" + "---|" * 13]
    for r in results:
        k = f" ({r['max_records']})" if r.get("max_records") else ""
        pe = f"{r['patient_epsilon']:.3g}{k}" if r.get("patient_epsilon") is not None else "-"
        changed = " (train.json changed since the first run)" if r.get("recipe_changed") else ""
        lines.append(f"| {r['bundle']}{changed} | {r['target_epsilon']:g} | {r['unit']} | {r['metric']} | {_num(r['value'], '.3f')} | "
                     f"{r['epsilon']:.2f} ({r['delta']:.0e}) | {pe} | {r['sigma']:.3f} | {r['sample_rate']:.4f} | "
                     f"{r['num_units']} | {r['steps']} | {_num(r['seconds'] / 60, '.1f')} | {_num(r['cpu_seconds'] / 60, '.1f')} |")
    return "\n".join(lines)


def _num(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)  # NaN: not measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/train.json"))
    ap.add_argument("--bundles", nargs="+", default=["dp_segmentation_2d"], choices=names)
    ap.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    ap.add_argument("--units", nargs="+", default=["record", "patient"], choices=["record", "patient"])
    ap.add_argument("--records-per-patient", nargs=2, type=int, default=[1, 10], metavar=("LOW", "HIGH"))
    ap.add_argument("--out", default="runs/patient_level")
    ap.add_argument("--accounting-only", action="store_true",
                    help="no training: only σ, q, steps and the patient's ε that the runs would have")
    ap.add_argument("--override", nargs="*", default=[], metavar="ID=VALUE",
                    help="bundle config overrides for every run (exploration; the documented table uses none)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = bundle_defaults._overrides(args.override)
    results, setup = [], {}
    for name in args.bundles:
        folder, counts = make_patient_data(name, out / name / "data", tuple(args.records_per_patient))
        rec = recipe(name)
        batch = dict(_overrides_dict(args.override)).get("batch_size", rec["batch_size"])
        setup[name] = {**counts, "recipe": rec,
                       "patient_batch": max(1, round(int(batch) * counts["patients"] / counts["records"]))}
        for epsilon in args.epsilons:
            for unit in args.units:
                if args.accounting_only:
                    r = account_only(name, setup[name], epsilon, unit)
                else:
                    r = run_one(name, out / name, folder, epsilon, unit,
                                setup[name]["patient_batch"] if unit == "patient" else None, extra)
                print(json.dumps(r), flush=True)
                results.append(r)
                (out / "patient_level.md").write_text(table(results, setup) + "\n")
    print(table(results, setup))


def _overrides_dict(pairs: list[str]) -> list[tuple[str, str]]:
    return [tuple(p.partition("=")[::2]) for p in pairs]


if __name__ == "__main__":
    main()
