"""The per-epoch fraction of clipped items (PrivacyMetricsHandler(clipped_fraction_key=...)) against per-example
gradient norms computed here by hand, one example at a time, on the batches the trainer really sampled."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.handlers import PrivacyMetricsHandler
from tests.conftest import make_classification_data

KEY = "clipped_fraction"


def _norms_by_hand(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Every example's gradient norm over all parameters: one backward pass per example, no trainer code."""
    norms = []
    for x, y in zip(images, labels):
        loss = nn.functional.cross_entropy(net(x[None]), y.reshape(1))
        grads = torch.autograd.grad(loss, list(net.parameters()))
        norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    return torch.stack(norms)


def test_clipped_fraction_per_epoch_matches_hand_computed_norms():
    data = make_classification_data(n=48, size=6)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    all_norms = _norms_by_hand(net, torch.stack([d["image"] for d in data]), torch.stack([d["label"] for d in data]))
    ordered = all_norms.sort().values  # the bound halfway between two norms: about half the examples above it,
    clip = float(ordered[len(ordered) // 2 - 1: len(ordered) // 2 + 1].mean())  # none within rounding of it
    # lr 0: the weights (and so every example's norm) stay fixed within an epoch; between the epochs the test
    # scales them, so the second epoch clips another share and a count that is not per epoch differs
    trainer = DPSupervisedTrainer(
        device="cpu", max_epochs=2, train_data_loader=DataLoader(data, batch_size=12), network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=nn.CrossEntropyLoss(),
        train_handlers=[PrivacyMetricsHandler(clipped_fraction_key=KEY)], noise_multiplier=1.0, max_grad_norm=clip,
        sampling_seed=0, decollate=False, grad_sample_mode="per_sample")
    counts, published = [[0, 0], [0, 0]], []

    def by_hand(engine):
        out = engine.state.output  # the rows this step really trained on (an empty Poisson batch has none)
        if not isinstance(out, dict):
            return
        norms = _norms_by_hand(engine.network, out["image"], out["label"])
        counts[engine.state.epoch - 1][0] += len(norms)
        counts[engine.state.epoch - 1][1] += int((norms > clip).sum())

    def scale_weights(engine):
        published.append(engine.state.metrics[KEY])
        with torch.no_grad():
            engine.network[1].weight.mul_(3.0)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, by_hand)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, scale_weights)
    trainer.run()
    expected = [clipped / seen for seen, clipped in counts]
    assert 0.1 < expected[0] < 0.9 and abs(expected[1] - expected[0]) > 0.05  # premise: both outcomes, epochs differ
    assert published == pytest.approx(expected, abs=1e-12)
    assert trainer.clipper.items_seen == sum(seen for seen, _ in counts)


def test_clipped_fraction_is_not_published_unless_asked(tiny_net, cls_data):
    trainer = DPSupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=DataLoader(cls_data, batch_size=8), network=tiny_net,
        optimizer=torch.optim.SGD(tiny_net.parameters(), lr=0.1), loss_function=nn.CrossEntropyLoss(),
        noise_multiplier=1.0, max_grad_norm=1.0)
    trainer.run()
    assert trainer.clipper.items_seen > 0  # counted ...
    assert not any("clipped" in k for k in trainer.state.metrics)  # ... but not published: outside the guarantee


def test_clipped_fraction_arguments_are_checked():
    with pytest.raises(ValueError, match="`clipped_fraction_key` must be a non-empty str or None, got ''"):
        PrivacyMetricsHandler(clipped_fraction_key="")
    engine = Engine(lambda e, b: None)
    engine.privacy = object()
    with pytest.raises(RuntimeError, match="`engine` must be a DP trainer whose clipper counts clipped items"):
        PrivacyMetricsHandler(clipped_fraction_key=KEY).attach(engine)
