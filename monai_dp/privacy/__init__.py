from .accountants import (
    ACCOUNTANTS,
    DPAccountant,
    GDPAccountant,
    PRVAccountant,
    RDPAccountant,
    create_accountant,
)
from .calibration import calibrate_noise_multiplier

__all__ = [
    "ACCOUNTANTS",
    "DPAccountant",
    "GDPAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "create_accountant",
]
