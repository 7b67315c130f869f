from .conversion import (
    CompatibilityReport,
    find_incompatible_modules,
    make_private_compatible,
)
from .ghost import GhostClipping
from .grad_sample import PerSampleGradients, per_sample_loss
from .heads import FeatureClassifier
from .scattering import WaveletScattering2D

__all__ = [
    "CompatibilityReport",
    "FeatureClassifier",
    "GhostClipping",
    "PerSampleGradients",
    "WaveletScattering2D",
    "find_incompatible_modules",
    "make_private_compatible",
    "per_sample_loss",
]
