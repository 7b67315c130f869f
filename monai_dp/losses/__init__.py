from .checks import check_per_sample_loss, check_targets

__all__ = ["check_per_sample_loss", "check_targets"]
