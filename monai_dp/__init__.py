"""monai_dp: differentially private training for MONAI."""

__version__ = "0.1.0"
