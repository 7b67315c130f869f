"""Fixed features computed once and kept on disk, so that runs over the same data (another ε, another seed, the
evaluation after training) do not recompute them.

A cache file is named after a digest of everything the features depend on: the extractor (its class, ``repr``,
parameters and buffers) and every record's input array. Other data or another extractor give another file, never
stale features. The files hold features of the private records: keep them where the data may be kept, never in
the folder shipped with a model (a bundle's ``models/``), and delete them with the data. Off unless a folder is
given (the Fashion-MNIST recipe's ``feature_cache_dir`` is null by default).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from monai_dp.bundle.features import _as_array, _FeatureDatalist, precompute_features

__all__ = ["cached_features", "extractor_digest"]

logger = logging.getLogger(__name__)


def extractor_digest(extractor: torch.nn.Module | Callable) -> str:
    """A digest of what the extractor computes: class, ``repr``, and every parameter and buffer (persistent or not)."""
    h = hashlib.sha256(f"{type(extractor).__module__}.{type(extractor).__qualname__}\n{extractor!r}".encode())
    if isinstance(extractor, torch.nn.Module):
        for name, t in list(extractor.named_parameters()) + list(extractor.named_buffers()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _records_digest(records: list, key: str, split: str, load: Callable | None) -> str:
    h = hashlib.sha256(f"{split}\n{len(records)}\n".encode())
    for i, r in enumerate(records):
        a = _as_array(r, key, split, i, load)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cached_features(datalist: Mapping[str, Sequence[Mapping]], extractor: torch.nn.Module | Callable,
                    cache_dir: str | Path | None = None, key: str = "image", batch_size: int = 1000,
                    device: str | torch.device | None = None, load: Callable | None = None) -> Mapping[str, list[dict]]:
    """``precompute_features`` whose results are kept in ``cache_dir`` (one ``.npy`` per split and content).

    Args:
        datalist, extractor, key, batch_size, device, load: as in :func:`precompute_features`.
        cache_dir: folder of the cache files; ``None`` computes without caching (exactly ``precompute_features``).

    Returns:
        A mapping with the same splits whose records hold the features under ``key``, computed on first read of
        a split or loaded from a cache file whose digest matches the extractor and the split's inputs.
    """
    computed = precompute_features(datalist, extractor, key=key, batch_size=batch_size, device=device, load=load)
    if cache_dir is None:
        return computed
    folder = Path(cache_dir)
    tag = extractor_digest(extractor)[:16]

    def compute(split: str, records: list) -> list[dict]:
        path = folder / f"features-{split}-{tag}-{_records_digest(records, key, split, load)[:16]}.npy"
        if path.exists():
            feats = np.load(path)
            if len(feats) == len(records):
                logger.info("Loaded the features of the %d '%s' records from %s.", len(records), split, path.name)
                return [{**r, key: f} for r, f in zip(records, feats)]
        new = computed[split]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, np.stack([r[key] for r in new]) if new else np.zeros((0,), np.float32))
        tmp.replace(path)
        return new

    return _FeatureDatalist(datalist, compute)
