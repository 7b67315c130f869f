from .accountants import (
    ACCOUNTANTS,
    DPAccountant,
    GDPAccountant,
    PRVAccountant,
    RDPAccountant,
    create_accountant,
)
from .calibration import calibrate_noise_multiplier
from .pld import (
    Mechanism,
    PLDAccountant,
    compose_epsilon,
    group_privacy_epsilon,
    max_steps_within_budget,
    patient_level_epsilon,
)

__all__ = [
    "ACCOUNTANTS",
    "DPAccountant",
    "GDPAccountant",
    "Mechanism",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "compose_epsilon",
    "create_accountant",
    "group_privacy_epsilon",
    "max_steps_within_budget",
    "patient_level_epsilon",
]
