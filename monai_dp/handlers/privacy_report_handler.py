"""PrivacyReportHandler: write what a DP run spent into a report file and the bundle's metadata.json."""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

from monai.utils import min_version, optional_import

from monai_dp.handlers.utils import require_dict, require_dp_engine

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = ["PrivacyReportHandler", "privacy_report"]

logger = logging.getLogger(__name__)


def privacy_report(engine: Any) -> dict:
    """The guarantee of a DP trainer's run so far, as plain JSON types."""
    import monai_dp

    priv = engine.privacy
    return {
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
        "budget_exhausted": bool(getattr(engine.state, "dp_budget_exhausted", False)),
        "monai_dp_version": monai_dp.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json_atomic(path: str, content: dict) -> None:
    """Write to a temporary file next to ``path`` and rename it over, so a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=4)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class PrivacyReportHandler:
    """On ``COMPLETED`` (and ``EXCEPTION_RAISED``), write the run's privacy report.

    Args:
        report_file: JSON file for the report (e.g. ``<bundle>/models/privacy_report.json``).
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
        """Record what was spent before the failure, then re-raise (Ignite would swallow it otherwise)."""
        try:
            self.write(engine)
        finally:
            raise e

    def __call__(self, engine: Engine) -> None:
        self.write(engine)

    def write(self, engine: Engine) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # every rank holds the same accounting; rank 0 writes it
        report = privacy_report(engine)
        _write_json_atomic(self.report_file, report)
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
