from .accountant_base import DPAccountant
from .accountant_gdp import GDPAccountant
from .accountant_pld import PLDAccountant
from .accountant_prv import PRVAccountant
from .accountant_rdp import RDPAccountant
from .calibration import calibrate_noise_multiplier
from .mechanism import Mechanism, largest_passing
from .pld import (
    compose_epsilon,
    group_privacy_epsilon,
    max_steps_within_budget,
    patient_level_epsilon,
)
from .registry import (
    ACCOUNTANTS,
    accountant_class,
    accountant_is_upper_bound,
    accountant_names,
    create_accountant,
    register_accountant,
    unregister_accountant,
)

__all__ = [
    "ACCOUNTANTS",
    "DPAccountant",
    "GDPAccountant",
    "Mechanism",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "accountant_class",
    "accountant_is_upper_bound",
    "accountant_names",
    "calibrate_noise_multiplier",
    "compose_epsilon",
    "create_accountant",
    "group_privacy_epsilon",
    "largest_passing",
    "max_steps_within_budget",
    "patient_level_epsilon",
    "register_accountant",
    "unregister_accountant",
]
