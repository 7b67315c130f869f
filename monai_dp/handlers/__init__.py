from .privacy_accountant_handler import PrivacyAccountantHandler
from .privacy_budget_handler import PrivacyBudgetHandler

__all__ = ["PrivacyAccountantHandler", "PrivacyBudgetHandler"]
