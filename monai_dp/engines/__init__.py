from .trainer import DPSupervisedTrainer
