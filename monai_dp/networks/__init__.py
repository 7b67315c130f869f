from .clip_contract import ClippedSum, trainable_parameters
from .clipping import CLIPPING_MODES, AutoClipper, make_clipper
from .conversion import (
    CompatibilityReport,
    find_incompatible_modules,
    make_private_compatible,
)
from .ghost import GhostClipping
from .grad_sample import PerSampleGradients, per_sample_loss
from .heads import FeatureClassifier
from .projection import ProjectedFeatureClassifier, statistics_releases
from .row_independence import find_row_mixing_modules, register_row_independent
from .row_probe import probe_row_independence
from .scattering import WaveletScattering2D

__all__ = [
    "CLIPPING_MODES",
    "AutoClipper",
    "ClippedSum",
    "CompatibilityReport",
    "FeatureClassifier",
    "GhostClipping",
    "PerSampleGradients",
    "ProjectedFeatureClassifier",
    "WaveletScattering2D",
    "find_incompatible_modules",
    "find_row_mixing_modules",
    "make_clipper",
    "make_private_compatible",
    "per_sample_loss",
    "probe_row_independence",
    "register_row_independent",
    "statistics_releases",
    "trainable_parameters",
]
