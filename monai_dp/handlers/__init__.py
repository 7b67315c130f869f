from typing import Any

from .ema_weights_handler import EMAWeightsHandler
from .privacy_budget_handler import PrivacyBudgetHandler
from .privacy_ledger_handler import PrivacyLedgerHandler
from .privacy_metrics_handler import PrivacyMetricsHandler
from .privacy_report_handler import PrivacyReportHandler, privacy_report, report_markdown

__all__ = [
    "EMAWeightsHandler",
    "PrivacyBudgetHandler",
    "PrivacyLedgerHandler",
    "PrivacyMetricsHandler",
    "PrivacyReportHandler",
    "privacy_report",
    "report_markdown",
]


def __getattr__(name: str) -> Any:
    """Deprecated names (``PrivacyAccountantHandler``), with a ``DeprecationWarning``."""
    from .privacy_accountant_handler import deprecated_name

    return deprecated_name(__name__, name)
