"""A digest of a network's weights and its optimizer's state: what a checkpoint's accounting belongs to."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["state_dict_digest", "weights_digest"]


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        for v in value:
            _feed(h, v)
    else:
        h.update(repr(value).encode())


def weights_digest(network: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    """BLAKE2b of every tensor of ``network.state_dict()`` and of the optimizer's per-parameter state.

    Equal after ``load_state_dict`` of the same checkpoint (bit-identical tensors), different after any update.
    Without ``optimizer`` it equals :func:`state_dict_digest` of the network's state dict as saved in a file.
    """
    return state_dict_digest(network.state_dict(), None if optimizer is None else optimizer.state_dict().get("state", {}))


def state_dict_digest(weights: dict, optimizer_state: dict | None = None) -> str:
    """The digest of a network's state dict (e.g. the ``"model"`` entry of a checkpoint file), see above."""
    h = hashlib.blake2b(digest_size=20)
    _feed(h, weights)
    if optimizer_state is not None:
        _feed(h, optimizer_state)
    return h.hexdigest()
