from .checks import check_per_sample_loss, check_targets, make_per_sample_loss

__all__ = ["check_per_sample_loss", "check_targets", "make_per_sample_loss"]
