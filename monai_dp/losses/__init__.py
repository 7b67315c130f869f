from .checks import check_per_sample_loss
