"""Training recipes for audits: picklable callables ``recipe(train_indices, seed) -> logits of every record``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ArrayClassifierRecipe", "make_small_cnn"]


def make_small_cnn(in_channels: int = 1, num_classes: int = 2, width: int = 16):
    """A small GroupNorm CNN for 2D images (the audit's default model)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(4, 2 * width), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * width, num_classes),
    )


@dataclass
class ArrayClassifierRecipe:
    """Train a classifier on in-memory images with ``DPSupervisedTrainer`` (or MONAI's trainer when ``dp=False``).

    ``images`` (N, C, H, W) float32, ``labels`` (N,), ``patient_ids`` (N,). DP settings are the trainer's
    (``target_epsilon`` or ``noise_multiplier``, ``max_grad_norm``, ``privacy_unit``); the same recipe is used
    for every audit model, exactly as configured.
    """

    images: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray
    num_classes: int = 2
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.5
    momentum: float = 0.0
    dp: bool = True
    dp_kwargs: dict = field(default_factory=lambda: {"target_epsilon": 8.0, "max_grad_norm": 1.0})
    width: int = 16
    device: str | None = None

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images, dtype=np.float32)
        self.labels = np.asarray(self.labels).astype(np.int64)
        if self.images.ndim != 4 or len(self.images) != len(self.labels) or len(self.labels) != len(self.patient_ids):
            from monai_dp.utils.validation import error_message

            raise ValueError(error_message("images, labels, patient_ids", "(N, C, H, W), (N,), (N,)",
                                           (self.images.shape, self.labels.shape, np.shape(self.patient_ids))))

    def __call__(self, train_indices: np.ndarray, seed: int) -> np.ndarray:
        import torch
        from monai.data import DataLoader, Dataset
        from monai.engines import SupervisedTrainer

        from monai_dp.engines import DPSupervisedTrainer

        torch.manual_seed(int(seed))
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        records = [{"image": torch.as_tensor(self.images[i]), "label": torch.as_tensor(int(self.labels[i])),
                    "patient_id": str(self.patient_ids[i])} for i in train_indices]
        net = make_small_cnn(self.images.shape[1], self.num_classes, self.width).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=self.learning_rate, momentum=self.momentum)
        loader = DataLoader(Dataset(records), batch_size=self.batch_size, shuffle=True)
        common: dict[str, Any] = dict(device=device, max_epochs=self.epochs, train_data_loader=loader, network=net,
                                      optimizer=opt, loss_function=torch.nn.CrossEntropyLoss())
        if self.dp:
            trainer = DPSupervisedTrainer(**common, sampling_seed=int(seed), **self.dp_kwargs)
        else:
            trainer = SupervisedTrainer(**common)
        trainer.logger.setLevel("WARNING")
        trainer.run()
        net.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(self.images), 512):
                out.append(net(torch.as_tensor(self.images[s : s + 512]).to(device)).float().cpu().numpy())
        logits = np.concatenate(out)
        return (logits, trainer.privacy.accountant.history) if self.dp else logits
