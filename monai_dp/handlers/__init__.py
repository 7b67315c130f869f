from .privacy_accountant_handler import PrivacyAccountantHandler
from .privacy_budget_handler import PrivacyBudgetHandler
from .privacy_report_handler import PrivacyReportHandler, privacy_report, report_markdown

__all__ = ["PrivacyAccountantHandler", "PrivacyBudgetHandler", "PrivacyReportHandler", "privacy_report", "report_markdown"]
