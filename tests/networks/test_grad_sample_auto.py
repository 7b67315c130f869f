"""``method="auto"`` of per-sample gradients: vmap is tried on one row first; its refusal is information."""

from __future__ import annotations

import logging

import pytest
import torch

from monai_dp.networks import PerSampleGradients


@pytest.mark.parametrize("vmap_works", [True, False])
def test_auto_probes_vmap_on_one_row_then_uses_it_or_expanded_weights(vmap_works, monkeypatch, caplog):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    engine = PerSampleGradients(net, torch.nn.CrossEntropyLoss())
    real, rows = engine._vmap_grad, []

    def vmap_grad(trainable, inputs, targets, ctx):
        rows.append(inputs.shape[0])
        if not vmap_works:
            raise RuntimeError("vmap: in-place scatter is not supported")
        return real(trainable, inputs, targets, ctx)

    monkeypatch.setattr(engine, "_vmap_grad", vmap_grad)
    with caplog.at_level(logging.INFO, logger="monai_dp.networks.grad_sample"):
        grads, losses, _ = engine(x, y)
    assert rows == ([1, 5] if vmap_works else [1])  # a failing vmap costs one row, not the batch's forward pass
    assert engine.method == ("vmap_grad" if vmap_works else "expanded")
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info == (["Per-sample gradients: vmap(grad)."] if vmap_works else
                    ["Per-sample gradients: expanded weights (vmap does not support this network or loss)."])
    reference = PerSampleGradients(net, torch.nn.CrossEntropyLoss(), method="expanded")(x, y)[0]
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name])
    assert losses.shape == (5,)
