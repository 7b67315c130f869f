from .errors import (
    DatasetError,
    DPConfigurationError,
    DPIncompatibleModuleError,
    NonFiniteGradientError,
    PrivacyBudgetExhaustedError,
)
from .distributed import rank_world
from .keys import DPKeys
from .validation import (
    check_choice,
    check_non_negative,
    check_open_unit_interval,
    check_positive,
    check_positive_int,
    check_sample_rate,
    check_type,
    error_message,
)

__all__ = [
    "DPKeys",
    "DPConfigurationError",
    "DPIncompatibleModuleError",
    "DatasetError",
    "NonFiniteGradientError",
    "PrivacyBudgetExhaustedError",
    "check_choice",
    "check_non_negative",
    "check_open_unit_interval",
    "check_positive",
    "check_positive_int",
    "check_sample_rate",
    "check_type",
    "error_message",
    "rank_world",
]
