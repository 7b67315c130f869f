from .accountants import ACCOUNTANTS, DPAccountant, GDPAccountant, PRVAccountant, RDPAccountant, create_accountant
from .calibration import calibrate_noise_multiplier
