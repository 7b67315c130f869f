"""PrivacyReportHandler: write what a DP run spent into a report file and the bundle's metadata.json."""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from typing import Any

from ignite.engine import Engine, Events

from monai_dp.handlers.utils import require_dict, require_dp_engine
from monai_dp.utils.distributed import rank_world
from monai_dp.utils.keys import DPKeys

__all__ = ["PrivacyReportHandler", "patient_level_guarantee", "privacy_report", "report_markdown"]

logger = logging.getLogger(__name__)


def privacy_report(engine: Any, patient_level: bool = True) -> dict:
    """The guarantee of a DP trainer's run so far, as plain JSON types.

    For a record-level run whose records carry patient ids, ``patient_level`` adds the guarantee that follows
    for the patient with the most records (k): tight (Poisson-subsampled mixture of Gaussians, PLD) and, for
    contrast, the textbook group-privacy bound.
    """
    import monai_dp

    priv = engine.privacy
    report = {
        "epsilon": priv.get_epsilon(),
        "delta": priv.delta,
        "target_epsilon": priv.target_epsilon,
        "noise_multiplier": priv.noise_multiplier,
        "max_grad_norm": priv.max_grad_norm,
        "sample_rate": priv.sample_rate,
        "steps": priv.steps,
        "num_units": priv.num_units,
        "unit": priv.unit,
        "sampling": priv.sampling,
        "accountant": priv.accountant.name,
        "history": [[float(sig), float(q), int(n)] for sig, q, n in priv.accountant.history],
        "prior": [dict(p) for p in getattr(priv, "prior", [])],  # earlier runs the weights continue (composed)
        "randomness": _randomness(priv),
        "budget_exhausted": bool(getattr(engine.state, DPKeys.BUDGET_EXHAUSTED, False)),
        "dataset_id": getattr(priv, "dataset_id", None),
        "patients": getattr(priv, "patients", None),
        "patient_level": None,
        "ledger": getattr(priv, "ledger_info", None),
        "monai_dp_version": monai_dp.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if patient_level and priv.unit == "record" and report["patients"] and priv.steps > 0:
        report["patient_level"] = patient_level_guarantee(priv.accountant.history, report["patients"]["max"], priv.delta)
    return report


def _randomness(priv: Any) -> dict:
    """Where the noise and the sampling came from; a given seed makes them replayable by whoever knows it."""
    from monai_dp.utils.randomness import REPRODUCIBLE_NOISE_WARNING

    seeds = {"noise_seed": getattr(priv, "noise_seed", None), "sampling_seed": getattr(priv, "sampling_seed", None)}
    reproducible = any(v is not None for v in seeds.values())
    return {**seeds, "secure_mode": bool(getattr(priv, "secure_mode", False)),
            "source": "given seeds" if reproducible else "operating system entropy (os.urandom)",
            "warning": REPRODUCIBLE_NOISE_WARNING if reproducible else None}


def patient_level_guarantee(history: list, records_per_patient: int, delta: float) -> dict:
    """ε for a patient with ``records_per_patient`` records of a record-level run with this accountant history."""
    from monai_dp.privacy import Mechanism, compose_epsilon, group_privacy_epsilon

    k = int(records_per_patient)
    tight = compose_epsilon([Mechanism(s, q, n, k) for s, q, n in history], delta)
    loose = None
    if len(history) == 1:
        s, q, n = history[0]
        loose = group_privacy_epsilon(s, q, n, k, delta)
    return {
        "records_per_patient": k,
        "epsilon": tight,
        "epsilon_group_privacy_formula": loose if loose is None or loose != float("inf") else "inf",
        "method": "PLD of the Poisson-subsampled mixture of Gaussians (binomial weights over sampled records)",
    }


def report_markdown(report: dict) -> str:
    """A short human-readable rendering of :func:`privacy_report`."""
    unit = report["unit"]
    lines = [
        f"# Privacy report ({unit}-level DP-SGD)",
        "",
        f"**(ε, δ) = ({report['epsilon']:.4g}, {report['delta']:.3g})** for each {unit}, after {report['steps']} "
        f"steps ({report['accountant'].upper()} accountant).",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| noise multiplier σ | {report['noise_multiplier']:.4g}"
        f"{' (schedule: ' + ', '.join(f'{h[0]:.4g} x {h[2]}' for h in report['history']) + ' steps)' if len(report.get('history') or []) > 1 else ''} |",
        f"| noise and sampling | {report['randomness']['source']}"
        f"{'; secure mode' if report['randomness']['secure_mode'] else ''}"
        f"{' — **' + report['randomness']['warning'] + '**' if report['randomness']['warning'] else ''} |",
        f"| clip norm C | {report['max_grad_norm']:.4g} |",
        f"| sample rate q | {report['sample_rate']:.4g} ({report['sampling']} sampling) |",
        f"| {unit}s N | {report['num_units']} |",
        f"| target ε | {report['target_epsilon']} |",
        f"| budget exhausted | {report['budget_exhausted']} |",
        f"| dataset | {report.get('dataset_id')} |",
    ]
    prior = [p for p in report.get("prior") or [] if p.get("steps")]
    if prior:
        lines.append(f"| continues from | {sum(p['steps'] for p in prior)} earlier steps behind the loaded weights "
                     f"({', '.join(str(p['source']) for p in prior)}), composed into ε |")
    pats = report.get("patients")
    if pats:
        lines.append(f"| patients / records | {pats['num_patients']} / {pats['num_records']} (records per patient: "
                     f"min {pats['min']}, median {pats['median']:g}, max {pats['max']}) |")
    led = report.get("ledger")
    if led:
        lines.append(f"| ledger budget | ε = {led.get('budget_epsilon')} at δ = {led.get('budget_delta')} |")
        lines.append(f"| ledger spent before / after | {led.get('spent_before')} / {led.get('spent_after')} |")
        if led.get("head"):
            lines.append(f"| ledger head after the run | `{led['head']}` (keep a copy: `monai-dp ledger verify --expect-head`) |")
    pl = report.get("patient_level")
    if pl:
        lines += ["", f"This is a record-level guarantee. For a patient with {pl['records_per_patient']} records it "
                  f"implies only ε = {pl['epsilon']:.4g} at the same δ (group-privacy formula: "
                  f"{pl['epsilon_group_privacy_formula']}). Train with `privacy_unit=\"patient\"` to protect patients."]
    return "\n".join(lines) + "\n"


def _write_json_atomic(path: str, content: dict) -> None:
    _write_text_atomic(path, json.dumps(content, indent=4) + "\n")


def _write_text_atomic(path: str, text: str) -> None:
    """Write to a temporary file next to ``path`` and rename it over, so a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class PrivacyReportHandler:
    """On ``COMPLETED`` (and ``EXCEPTION_RAISED``), write the run's privacy report (JSON, and markdown beside it).

    Args:
        report_file: JSON file for the report (e.g. ``<bundle>/models/privacy_report.json``); the markdown
            rendering goes to the same name with ``.md``.
        meta_file: a bundle's ``metadata.json`` whose ``privacy`` section is replaced by the report
            (other keys are kept); ``None`` leaves metadata alone.
    """

    def __init__(self, report_file: str, meta_file: str | None = None) -> None:
        self.report_file = str(report_file)
        self.meta_file = None if meta_file is None else str(meta_file)
        self.last_report: dict | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``COMPLETED`` and ``EXCEPTION_RAISED``; attaching twice does nothing."""
        require_dp_engine(engine)
        if not engine.has_event_handler(self.write, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.write)
        if not engine.has_event_handler(self.exception_raised, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """Record what was spent before the failure, then re-raise (Ignite would swallow it otherwise).

        A run refused before any step was accounted (a spent ledger, weights with no known history) spent nothing
        and changed no weights: the report of the model trained before it is left as it is.
        """
        try:
            if engine.privacy.steps > 0:
                self.write(engine)
        finally:
            raise e

    def __call__(self, engine: Engine) -> None:
        self.write(engine)

    def write(self, engine: Engine) -> None:
        if rank_world()[0] != 0:
            return  # every rank holds the same accounting; rank 0 writes it
        priv = engine.privacy
        patients = getattr(priv, "patients", None)
        extra = (f" and the guarantee it implies for a patient with {patients['max']} records (a PLD composition, "
                 "the slow part)" if priv.unit == "record" and patients and priv.steps > 0 else "")
        logger.info("Writing the privacy report: ε after %d steps%s.", priv.steps, extra)
        report = privacy_report(engine)
        _write_json_atomic(self.report_file, report)
        _write_text_atomic(os.path.splitext(self.report_file)[0] + ".md", report_markdown(report))
        if self.meta_file is not None:
            with open(self.meta_file) as f:
                meta = json.load(f)
            meta["privacy"] = dict(meta.get("privacy", {}), **report)
            _write_json_atomic(self.meta_file, meta)
        self.last_report = report
        logger.info("Privacy report: ε = %.4g at δ = %.3g after %d steps, written to %s.", report["epsilon"],
                    report["delta"], report["steps"], self.report_file)

    def state_dict(self) -> dict:
        return {"last_report": None if self.last_report is None else json.dumps(self.last_report)}

    def load_state_dict(self, state_dict: dict) -> None:
        require_dict(state_dict)
        raw = state_dict.get("last_report")
        self.last_report = None if raw is None else json.loads(raw)
