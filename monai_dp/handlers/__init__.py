from .privacy_accountant_handler import PrivacyAccountantHandler
from .privacy_budget_handler import PrivacyBudgetHandler
from .privacy_ledger_handler import PrivacyLedgerHandler
from .privacy_report_handler import PrivacyReportHandler, privacy_report, report_markdown

__all__ = [
    "PrivacyAccountantHandler",
    "PrivacyBudgetHandler",
    "PrivacyLedgerHandler",
    "PrivacyReportHandler",
    "privacy_report",
    "report_markdown",
]
