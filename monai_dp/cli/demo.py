"""A DP training run on generated images, stopped by its privacy budget (about 15 s on 2 idle CPU cores).

``python -m monai_dp demo`` trains a small MONAI DenseNet (BatchNorm converted to GroupNorm) on
generated 2D images (does the image hold a bright "lesion" disc or only noise?), with record-level
DP-SGD under an ε budget. σ is fixed, so the run stops at the budget before ``max_epochs``; it
prints ε after every epoch, the validation accuracy and why it stopped.

Torch, MONAI and the trainer are imported when the demo runs, not for ``--help``.
"""

from __future__ import annotations

import argparse
import logging
import time

from monai_dp.cli import DefaultsHelpFormatter

__all__ = ["main", "make_synthetic_images", "run_demo"]


def make_synthetic_images(n: int, size: int = 32, seed: int = 0) -> list[dict]:
    """``n`` records ``{"image": (1, size, size), "label": 0|1}``: noise (0) or noise with a faint disc (1)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    records = []
    for i in range(n):
        label = i % 2
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        r = rng.integers(size // 8, size // 4)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2) * float(label)
        img = rng.normal(0.0, 1.0, size=(size, size)) + mask
        records.append({"image": torch.tensor(img[None], dtype=torch.float32), "label": torch.tensor(label)})
    return records


def run_demo(target_epsilon: float = 3.0, noise_multiplier: float = 1.0, max_epochs: int = 30, n_train: int = 1000,
             batch_size: int = 50, accountant: str = "prv", seed: int = 0, device: str | None = None) -> dict:
    """Train and return ``{"epsilon", "delta", "steps", "val_accuracy", "stopped_by_budget", "seconds"}``."""
    import torch
    from ignite.engine import Events
    from ignite.metrics import Accuracy
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator
    from monai.handlers import ValidationHandler
    from monai.networks.nets import DenseNet

    from monai_dp.engines import DPSupervisedTrainer

    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train = make_synthetic_images(n_train, seed=seed)
    val = make_synthetic_images(400, seed=seed + 1)
    net = DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                   block_config=(2, 2, 2)).to(dev)  # few weights: less noise in total for the same σ
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    acc = Accuracy(output_transform=lambda out: (out["pred"].argmax(1), out["label"]))
    evaluator = SupervisedEvaluator(device=dev, val_data_loader=DataLoader(val, batch_size=100), network=net,
                                    key_val_metric={"val_acc": acc}, decollate=False)
    trainer = DPSupervisedTrainer(
        device=dev, max_epochs=max_epochs, train_data_loader=DataLoader(train, batch_size=batch_size, shuffle=True),
        network=net, optimizer=opt, loss_function=torch.nn.CrossEntropyLoss(), target_epsilon=target_epsilon,
        noise_multiplier=noise_multiplier, max_grad_norm=1.0, accountant=accountant, target_delta=1e-5,
        train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True)],
    )

    @trainer.on(Events.EPOCH_COMPLETED)
    def _report(engine):
        print(f"epoch {engine.state.epoch}: ε = {engine.get_epsilon():.3f} (δ = {engine.privacy.delta:g}) after "
              f"{engine.dp_steps} steps; val accuracy {evaluator.state.metrics.get('val_acc', float('nan')):.3f}",
              flush=True)

    start = time.time()
    trainer.run()
    if getattr(trainer.state, "dp_budget_exhausted", False):
        evaluator.run()
    return {"epsilon": trainer.get_epsilon(), "delta": trainer.privacy.delta, "steps": trainer.dp_steps,
            "val_accuracy": float(evaluator.state.metrics.get("val_acc", float("nan"))),
            "stopped_by_budget": bool(getattr(trainer.state, "dp_budget_exhausted", False)),
            "seconds": time.time() - start}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monai-dp demo", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--target-epsilon", type=float, default=3.0, help="privacy budget ε: training stops before it")
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="σ, noise relative to the clip norm (C = 1)")
    p.add_argument("--max-epochs", type=int, default=30, help="upper limit; the budget stops the run first")
    p.add_argument("--n-train", type=int, default=1000, help="generated training images (q = batch size / this)")
    p.add_argument("--batch-size", type=int, default=50, help="expected Poisson batch size")
    p.add_argument("--accountant", default="prv", choices=["prv", "pld", "rdp"], help="privacy accountant")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images and the initial weights "
                   "(noise and sampling stay seeded by the operating system)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ignite.engine.engine.SupervisedEvaluator").setLevel(logging.WARNING)  # 4 lines per epoch
    res = run_demo(args.target_epsilon, args.noise_multiplier, args.max_epochs, args.n_train, args.batch_size,
                   args.accountant, args.seed)
    why = "the privacy budget was reached" if res["stopped_by_budget"] else "max_epochs was reached"
    print(f"Done in {res['seconds']:.0f} s: {res['steps']} DP-SGD steps, ε = {res['epsilon']:.3f} "
          f"(budget {args.target_epsilon}, δ = {res['delta']:g}), validation accuracy {res['val_accuracy']:.3f}; "
          f"stopped because {why}.")
    return 0
