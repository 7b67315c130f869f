"""Every bundle's default run, as its docs/README.md states it, against the same network trained without DP.

For each bundle under ``bundles/`` this copies the bundle into ``--out`` and runs, as a user would::

    python -m monai.bundle run --config_file <bundle>/configs/train.json --bundle_root <bundle>
    python -m monai.bundle run --config_file "['<bundle>/configs/train.json','<bundle>/configs/evaluate.json']" \\
        --bundle_root <bundle>

(the embedded synthetic data set, the bundle's own recipe, ε = ``target_epsilon`` of ``train.json``), then the same
configs with the trainer swapped for MONAI's ``SupervisedTrainer`` (no clipping, no noise, no accounting; every
other id unchanged, so the same network, data, splits, epochs, batch size and learning rate). Both are scored by
``evaluate.json`` on the held-out ``"test"`` split (the checkpoint with the best validation metric). It writes a
markdown table (bundle, metric with DP, metric without DP, ε, minutes) to ``--out/bundle_defaults.md`` and prints
it. It measures; it asserts nothing.

    python benchmarks/bundle_defaults.py                      # all four bundles (about 10-20 min on 2 CPU cores)
    python benchmarks/bundle_defaults.py --bundles dp_segmentation_2d --skip-nondp
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = {"classification": "val_accuracy", "segmentation": "val_mean_dice"}


def _copy(name: str, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(REPO / "bundles" / name, dest, ignore=shutil.ignore_patterns("models", "eval"))
    return dest


def _run(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``python -m monai.bundle run ARGS`` in a subprocess (output to ``log``); return its wall time and CPU time
    (user + system, all threads) in s. On a shared machine the CPU time is the measure that others' load leaves alone."""
    start, cpu = time.time(), _children_cpu()
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], stdout=f, stderr=subprocess.STDOUT,
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        raise RuntimeError(f"bundle run failed (exit {proc.returncode}); see {log}")
    return time.time() - start, _children_cpu() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _overrides(pairs: list[str]) -> list[str]:
    out = []
    for pair in pairs:
        key, _, value = pair.partition("=")
        out += [f"--{key}", value]
    return out


def _non_dp_config(root: Path) -> Path:
    """``train.json`` with MONAI's ``SupervisedTrainer`` in place of the DP trainer, everything else unchanged."""
    config = without_dp(json.loads((root / "configs" / "train.json").read_text()))
    path = root / "configs" / "train_non_dp.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def without_dp(config: dict) -> dict:
    """A bundle's training config (a dict, changed in place and returned) with MONAI's ``SupervisedTrainer`` in
    place of the DP trainer: the trainer arguments it does not take, monai_dp's training handlers, the logged DP
    state and the privacy history saved with the best checkpoint are dropped; everything else is unchanged."""
    from monai.engines import SupervisedTrainer

    trainer = config["train"]["trainer"]
    accepted = set(inspect.signature(SupervisedTrainer.__init__).parameters)
    config["train"]["trainer"] = {k: v for k, v in trainer.items() if k == "_target_" or k in accepted}
    config["train"]["trainer"]["_target_"] = "SupervisedTrainer"
    config["train"]["handlers"] = [h for h in config["train"]["handlers"]
                                   if not h.get("_target_", "").startswith("monai_dp.")]
    config["dp_log_attributes"] = []
    for handler in config["validate"]["handlers"]:  # the best checkpoint holds no privacy history without DP
        if isinstance(handler.get("save_dict"), dict):
            handler["save_dict"].pop("privacy", None)
    return config


def run_bundle(name: str, out: Path, dp: bool, extra: list[str]) -> dict:
    root = _copy(name, out / name / ("dp" if dp else "non_dp"))
    log = root / "run.log"
    train = root / "configs" / "train.json" if dp else _non_dp_config(root)
    seconds, cpu_seconds = _run(["--config_file", str(train), "--bundle_root", str(root), *extra], log)
    files = f"['{train}','{root / 'configs' / 'evaluate.json'}']"
    _run(["--config_file", files, "--bundle_root", str(root), *extra], log)
    metric = METRICS["segmentation" if "segmentation" in name else "classification"]
    rows = {r[0]: r[1] for r in csv.reader(open(root / "eval" / "metrics.csv", newline=""), delimiter="\t")
            if len(r) >= 2}
    if metric not in rows:  # older MetricsSaver versions write comma-separated
        rows = {r[0]: r[1] for r in csv.reader(open(root / "eval" / "metrics.csv", newline="")) if len(r) >= 2}
    result = {"bundle": name, "dp": dp, "metric": metric, "value": float(rows[metric]), "seconds": seconds,
              "cpu_seconds": cpu_seconds}
    if dp:
        report = json.loads((root / "models" / "privacy_report.json").read_text())
        result.update(epsilon=report.get("epsilon"), delta=report.get("delta"), steps=report.get("steps"),
                      sigma=report.get("noise_multiplier"), max_grad_norm=report.get("max_grad_norm"))
    return result


def table(results: list[dict]) -> str:
    import monai
    import opacus
    import torch

    lines = [f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}, monai {monai.__version__}, "
             f"opacus {opacus.__version__}. Metric on the held-out test split (evaluate.json).", "",
             "| bundle | metric | DP | non-DP | ε (δ) | σ | C | steps | minutes DP / non-DP (wall) | CPU minutes DP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_name: dict[str, dict] = {}
    for r in results:
        by_name.setdefault(r["bundle"], {})["dp" if r["dp"] else "non_dp"] = r
    for name, pair in by_name.items():
        dp, non = pair.get("dp"), pair.get("non_dp")
        first = dp or non
        eps = f"{dp['epsilon']:.2f} ({dp['delta']:.1e})" if dp and dp.get("epsilon") is not None else "-"
        lines.append(
            f"| {name} | {first['metric']} | {dp['value']:.3f} | " if dp else f"| {name} | {first['metric']} | - | ")
        lines[-1] += (f"{non['value']:.3f} | " if non else "- | ") + f"{eps} | "
        lines[-1] += (f"{dp['sigma']:.3f} | {dp['max_grad_norm']:g} | {dp['steps']} | " if dp else "- | - | - | ")
        lines[-1] += (f"{dp['seconds'] / 60:.1f}" if dp else "-") + " / " + (f"{non['seconds'] / 60:.1f}" if non else "-")
        lines[-1] += " | " + (f"{dp['cpu_seconds'] / 60:.1f}" if dp else "-") + " |"
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/train.json"))
    ap.add_argument("--bundles", nargs="+", default=names, choices=names)
    ap.add_argument("--out", default="runs/bundle_defaults")
    ap.add_argument("--skip-nondp", action="store_true")
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--override", nargs="*", default=[], metavar="ID=VALUE",
                    help="bundle config overrides for both runs (exploration; the documented table uses none)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = _overrides(args.override)
    results = []
    for name in args.bundles:
        for dp in [d for d, skip in ((True, args.skip_dp), (False, args.skip_nondp)) if not skip]:
            r = run_bundle(name, out, dp, extra)
            print(json.dumps(r), flush=True)
            results.append(r)
    text = table(results)
    (out / "bundle_defaults.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
