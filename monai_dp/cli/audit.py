"""``monai-dp audit``: patient-level LiRA audit of a DP (or non-DP) training recipe, with a report.

    monai-dp audit --out audit/ --synthetic --num-models 64 --target-epsilon 8 --privacy-unit patient
    monai-dp audit --out audit/ --npz data.npz --no-dp        # keys: images, labels, patient_ids[, meta_<name>]
    monai-dp audit --out audit/ --bundle bundles/dp_classification_2d --override dataset_dir='"/data/x"'


Trains ``--num-models`` models on random halves of the patients (resumable: rerun the same command),
scores every record under every model and writes ``report.md``/``report.html``, figures and CSVs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from monai_dp.cli import DefaultsHelpFormatter

__all__ = ["EXIT_INTERRUPTED", "array_recipe", "main", "parse_overrides"]

EXIT_INTERRUPTED = 130  # as the shell reports a process stopped by Ctrl-C (128 + SIGINT)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monai-dp audit", description="Patient-level LiRA audit of a DP (or non-DP) "
                                "training recipe, with a report.",
                                formatter_class=DefaultsHelpFormatter,
                                epilog="The recipe defaults (--epochs, --lr, --momentum, --width, --batch-size) are "
                                       "the recipe of the measured audits in docs/audit.md. Ctrl-C stops the audit "
                                       "(exit code 130); rerunning the same command resumes it.")
    p.add_argument("--out", required=True, help="folder for models, CSVs, figures and the report")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--npz", help="images (N,C,H,W), labels (N,), patient_ids (N,), optional meta_<column>")
    data.add_argument("--synthetic", action="store_true", help="the synthetic audit data set (multi-record patients)")
    data.add_argument("--bundle", help="a classification bundle root: audit its train.json recipe as configured")
    data.add_argument("--self-audit", action="store_true",
                      help="check the DP trainer itself with Dirac canaries (noise and clipping as claimed); "
                           "uses --num-models runs per side, --steps, --noise-multiplier (default 1)")
    p.add_argument("--steps", type=int, default=4, help="self-audit: full-batch steps per run")
    p.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                   help="bundle config override, e.g. --override max_epochs=5 --override dataset_dir='\"/data\"'")
    p.add_argument("--num-patients", type=int, default=400, help="synthetic data: number of patients")
    p.add_argument("--max-records", type=int, default=6, help="synthetic data: most records of one patient")
    p.add_argument("--mean-records", type=float, default=1 / 0.45,
                   help="synthetic data: mean records per patient before the cap (geometric)")
    p.add_argument("--num-models", type=int, default=64, help="models trained, each on a random half of the patients")
    p.add_argument("--workers", type=int, default=1, help="models trained at a time, in separate processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the halves (and of the synthetic data)")
    p.add_argument("--epochs", type=int, default=30, help="recipe: training epochs of each model")
    p.add_argument("--batch-size", type=int, default=64, help="recipe: expected batch size")
    p.add_argument("--lr", type=float, default=0.1, help="recipe: SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="recipe: SGD momentum")
    p.add_argument("--width", type=int, default=32, help="recipe: channels of the small GroupNorm CNN")
    p.add_argument("--no-dp", action="store_true", help="audit the same recipe without DP")
    p.add_argument("--target-epsilon", type=float, default=8.0, help="ε each model is trained to (σ calibrated)")
    p.add_argument("--noise-multiplier", type=float, default=None,
                   help="σ instead of --target-epsilon (the self-audit's default: 1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip norm C")
    p.add_argument("--privacy-unit", choices=["record", "patient"], default="record",
                   help="what each model's DP protects")
    p.add_argument("--percentile", type=float, default=99.0, help="vulnerable tail for the subgroup test")
    return p


def _load(args) -> dict:
    if args.synthetic:
        from monai_dp.audit.synthetic import make_audit_dataset

        return make_audit_dataset(num_patients=args.num_patients, max_records=args.max_records,
                                  mean_records=args.mean_records, seed=args.seed)
    with np.load(args.npz, allow_pickle=False) as f:
        missing = {"images", "labels", "patient_ids"} - set(f.files)
        if missing:
            raise ValueError(f"`--npz` file {args.npz} must hold images, labels and patient_ids, "
                             f"missing {sorted(missing)}.")
        return {"images": f["images"], "labels": f["labels"], "patient_ids": f["patient_ids"].astype(str),
                "metadata": {k[5:]: f[k].astype(str) for k in f.files if k.startswith("meta_")}}


def parse_overrides(items: list[str]) -> dict:
    """``--override KEY=VALUE`` items as a dict: VALUE read as JSON, or kept as text when it is not JSON."""
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def array_recipe(args: argparse.Namespace, data: dict):
    """The :class:`~monai_dp.audit.recipes.ArrayClassifierRecipe` the flags describe (σ given, or ε targeted)."""
    from monai_dp.audit.recipes import ArrayClassifierRecipe

    dp_kwargs = {"max_grad_norm": args.max_grad_norm, "privacy_unit": args.privacy_unit}
    if args.noise_multiplier is not None:
        dp_kwargs["noise_multiplier"] = args.noise_multiplier
    else:
        dp_kwargs["target_epsilon"] = args.target_epsilon
    return ArrayClassifierRecipe(data["images"], data["labels"], data["patient_ids"],
                                 num_classes=int(data["labels"].max()) + 1, epochs=args.epochs,
                                 batch_size=args.batch_size, learning_rate=args.lr, momentum=args.momentum,
                                 dp=not args.no_dp, dp_kwargs=dp_kwargs, width=args.width)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return _run(args)
    except (ValueError, TypeError) as err:  # the checks' messages name the argument, the value and the fix
        print(f"monai-dp audit: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"monai-dp audit: interrupted; the models finished so far are kept in {args.out}: rerun the same "
              "command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    if args.bundle:
        return _bundle_audit(args)
    if args.self_audit:
        return _self_audit(args)
    from monai_dp.audit.lira import run_lira
    from monai_dp.audit.report import analyse, write_report
    from monai_dp.privacy.pld import Mechanism

    try:
        data = _load(args)
    except (OSError, ValueError) as err:
        print(f"monai-dp audit: {err}", file=sys.stderr)
        return 2
    recipe = array_recipe(args, data)
    res = run_lira(recipe, data["labels"], data["patient_ids"], args.out, num_models=args.num_models,
                   workers=args.workers, seed=args.seed)
    mechanisms = None if args.no_dp else [Mechanism(*h) for h in res["histories"][0]]
    unit = "none (no DP)" if args.no_dp else args.privacy_unit
    analysis = analyse(res["scores"], res["member"], data["patient_ids"], mechanisms, unit=unit,
                       metadata=data.get("metadata") or None, percentile=args.percentile)
    path = write_report(analysis, args.out)
    print(path.read_text())
    return 0


def _self_audit(args: argparse.Namespace) -> int:
    from monai_dp.audit.self_audit import run_self_audit

    res = run_self_audit(args.out, runs=args.num_models, steps=args.steps, seed=args.seed,
                         noise_multiplier=1.0 if args.noise_multiplier is None else args.noise_multiplier)
    print((Path(args.out) / "self_audit.md").read_text())
    return 0 if res["passed"] else 1


def _bundle_audit(args: argparse.Namespace) -> int:
    from monai_dp.audit.lira import run_lira
    from monai_dp.audit.recipes import BundleRecipe
    from monai_dp.audit.report import analyse, write_report
    from monai_dp.privacy.pld import Mechanism

    overrides = parse_overrides(args.override)
    recipe = BundleRecipe(args.bundle, overrides=overrides)
    records = recipe.records()
    labels = np.asarray([int(np.asarray(r["label"]).reshape(-1)[0]) for r in records])
    pids = np.asarray([str(r.get(recipe.patient_key, f"record-{i}")) for i, r in enumerate(records)])
    res = run_lira(recipe, labels, pids, args.out, num_models=args.num_models, workers=args.workers, seed=args.seed)
    history = res["histories"][0]
    unit = str(overrides.get("privacy_unit", "record")) if history else "none (no DP)"
    analysis = analyse(res["scores"], res["member"], pids, [Mechanism(*h) for h in history] or None, unit=unit,
                       percentile=args.percentile)
    print(write_report(analysis, args.out).read_text())
    return 0
