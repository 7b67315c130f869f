"""Fixed feature extraction, done once and in batches, before DP training of a small model on top.

Training a small model with DP-SGD on good fixed features is often more accurate than training a whole
network privately (Tramèr & Boneh, ICLR 2021): the noise grows with the number of trained parameters.
A *fixed* extractor (a scattering transform, or an encoder trained on public data) maps each record to
its features independently of every other record, so it costs no privacy. It must not have been fitted
on the private data: that would leak it outside the accounted mechanism.

Computing the features per item in the data loader would redo them every epoch; here they are computed
once per record, in batches, and stored in the records as float32 arrays (the inputs are not changed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from monai_dp.utils.validation import error_message

__all__ = ["precompute_features"]

logger = logging.getLogger(__name__)


def _as_array(record: Mapping, key: str, split: str, index: int, load: Callable | None) -> np.ndarray:
    value = record.get(key) if isinstance(record, Mapping) else None
    if value is None:
        raise ValueError(error_message(f"datalist['{split}'][{index}]", f"a record with a '{key}' entry",
                                       type(record).__name__ if not isinstance(record, Mapping) else sorted(record)))
    if load is not None:
        value = load({key: value})[key]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(error_message(f"datalist['{split}'][{index}]['{key}']", "an in-memory array",
                                      type(value).__name__, "Pass `load=LoadRecordd(keys=key)` for file paths."))
    return np.asarray(value, dtype=np.float32)


class _FeatureDatalist(Mapping):
    """A datalist whose splits are transformed on first access (evaluation then never touches training)."""

    def __init__(self, datalist: Mapping, compute: Callable[[str, list], list[dict]]) -> None:
        self._raw, self._compute, self._done = datalist, compute, {}

    def __getitem__(self, split: str) -> list[dict]:
        if split not in self._done:
            self._done[split] = self._compute(split, list(self._raw[split]))
        return self._done[split]

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def precompute_features(datalist: Mapping[str, Sequence[Mapping]], extractor: torch.nn.Module | Callable,
                        key: str = "image", batch_size: int = 1000, device: str | torch.device | None = None,
                        load: Callable | None = None) -> Mapping[str, list[dict]]:
    """Replace ``record[key]`` by ``extractor(record[key])`` in every split, computed in batches.

    Args:
        datalist: ``{"training": [...], "validation": [...], ...}`` of records (dicts), as ``load_datalist`` gives.
        extractor: a fixed module or function ``(B, *image_shape) -> (B, *feature_shape)``; run in eval mode
            without gradients. It must not depend on the private data.
        key: the record entry to transform.
        batch_size: images per extractor call.
        device: where to run it (default: CUDA when available).
        load: optional dict transform that turns ``{key: value}`` into an array (e.g. ``LoadRecordd``) for
            datalists of file paths.

    Returns:
        A read-only mapping with the same splits; a split is computed when first read (then kept) and holds
        copies of the records whose ``key`` is a float32 feature array.
    """
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(error_message("batch_size", "an int >= 1", batch_size))
    if not isinstance(datalist, Mapping):
        raise TypeError(error_message("datalist", "a dict of splits", type(datalist).__name__))
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(extractor, torch.nn.Module):
        extractor = extractor.to(dev).eval()

    def compute(split: str, records: list) -> list[dict]:
        start, new = time.time(), []
        for b in range(0, len(records), batch_size):
            chunk = records[b : b + batch_size]
            arrays = [_as_array(r, key, split, b + i, load) for i, r in enumerate(chunk)]
            first = arrays[0].shape
            bad = next((i for i, a in enumerate(arrays) if a.shape != first), None)
            if bad is not None:
                raise ValueError(error_message(f"datalist['{split}'][{b + bad}]['{key}'] shape",
                                               f"{first} like the other records", arrays[bad].shape,
                                               "Resize the images to one shape before the extractor."))
            with torch.no_grad():
                feats = extractor(torch.from_numpy(np.stack(arrays)).to(dev))
            new.extend({**r, key: f} for r, f in zip(chunk, feats.float().cpu().numpy()))
        logger.info("Precomputed features of the %d '%s' records in %.1f s.", len(records), split, time.time() - start)
        return new

    return _FeatureDatalist(datalist, compute)
