from .accountants import ACCOUNTANTS, DPAccountant, GDPAccountant, PRVAccountant, RDPAccountant, create_accountant
from .calibration import calibrate_noise_multiplier

__all__ = [
    "ACCOUNTANTS",
    "DPAccountant",
    "GDPAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "create_accountant",
    "calibrate_noise_multiplier",
]
