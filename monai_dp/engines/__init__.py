from .trainer import DPSupervisedTrainer

__all__ = ["DPSupervisedTrainer"]
