"""Training recipes for audits: picklable callables ``recipe(train_indices, seed) -> logits of every record``."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ArrayClassifierRecipe", "BundleRecipe", "make_small_cnn"]


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


@dataclass
class BundleRecipe:
    """Train a classification bundle (e.g. ``bundles/dp_classification_2d``) exactly as configured, on a subset.

    The audited population is the bundle's training split (``datalist['training']``). Each call copies the
    bundle's configs to a temporary bundle root, trains on ``train_indices`` of that split through MONAI's
    ``ConfigWorkflow`` (validation switched off), and returns the logits of every record of the split (with the
    validation preprocessing) and the run's accountant history.
    """

    bundle_root: str
    overrides: dict = field(default_factory=dict)
    config_file: str = "configs/train.json"
    patient_key: str = "patient_id"

    def _workflow(self, root: str, **extra):
        from monai.bundle import ConfigWorkflow

        return ConfigWorkflow(config_file=str(Path(root) / self.config_file), workflow_type="train",
                              **{**self.overrides, "bundle_root": root, **extra})

    def records(self) -> list[dict]:
        """The audited records (the bundle's training split), with labels and patient ids."""
        with tempfile.TemporaryDirectory() as tmp:
            root = self._copy(tmp)
            wf = self._workflow(root)
            return list(wf.parser.get_parsed_content("datalist")["training"])

    def _copy(self, tmp: str) -> str:
        root = str(Path(tmp) / "bundle")
        shutil.copytree(Path(self.bundle_root) / "configs", Path(root) / "configs")
        data = Path(self.bundle_root) / "data"
        if data.exists():
            shutil.copytree(data, Path(root) / "data")
        return root

    def __call__(self, train_indices: np.ndarray, seed: int):
        import torch
        from monai.data import DataLoader, Dataset

        with tempfile.TemporaryDirectory() as tmp:
            root = self._copy(tmp)
            indices = [int(i) for i in train_indices]
            # the bundle's own `seed` fixes its data and split, so it stays; the model's seed varies the training
            wf = self._workflow(root, val_interval=10**9,
                                **{"train#dataset#data": f"$[@datalist['training'][i] for i in {indices}]"})
            wf.initialize()
            from monai.utils import set_determinism

            set_determinism(seed=int(seed))
            wf.run()
            parser = wf.parser
            net = parser.get_parsed_content("network")
            trainer = parser.get_parsed_content("train#trainer")
            records = parser.get_parsed_content("datalist")["training"]
            ds = Dataset(records, transform=parser.get_parsed_content("validate#preprocessing"))
            device = next(net.parameters()).device
            net.eval()
            out = []
            with torch.no_grad():
                for batch in DataLoader(ds, batch_size=64):
                    out.append(net(batch["image"].to(device)).float().cpu().numpy())
            history = getattr(getattr(trainer, "privacy", None), "accountant", None)
            logits = np.concatenate(out)
            return (logits, history.history) if history is not None else logits
