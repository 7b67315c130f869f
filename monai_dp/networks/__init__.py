from .conversion import (
    CompatibilityReport,
    find_incompatible_modules,
    make_private_compatible,
)
from .grad_sample import PerSampleGradients, per_sample_loss

__all__ = [
    "CompatibilityReport",
    "PerSampleGradients",
    "find_incompatible_modules",
    "make_private_compatible",
    "per_sample_loss",
]
