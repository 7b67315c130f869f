"""What bundle configs hand to metrics and write as run outputs.

Run outputs go under the bundle's ``models/`` (and ``eval/``) folders, never into ``configs/``: a run must not
rewrite the tracked configuration.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

from monai_dp.utils.validation import error_message

__all__ = ["from_engine_stacked", "run_metadata_file"]


def from_engine_stacked(keys: Sequence[str]) -> Callable[[Any], tuple[torch.Tensor, ...]]:
    """Like ``monai.handlers.from_engine`` but stacks decollated items into batch tensors.

    Ignite's ``Accuracy`` wants ``(y_pred (B, C), y (B,))`` tensors, while MONAI engines hand handlers a
    decollated list of dicts.
    """

    def _stack(values: Sequence[Any]) -> torch.Tensor:
        out = torch.stack([torch.as_tensor(v) for v in values])
        return out.squeeze(-1) if out.ndim == 2 and out.shape[-1] == 1 else out

    def _transform(output: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(output, dict):  # a batch that was not decollated
            return tuple(torch.as_tensor(output[k]) for k in keys)
        return tuple(_stack([item[k] for item in output]) for k in keys)

    return _transform


def run_metadata_file(meta_file: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Copy the bundle's ``metadata.json`` to ``out_dir/metadata.json`` and return that path.

    A bundle hands the copy to ``PrivacyReportHandler(meta_file=...)``, which fills its ``privacy`` section
    with what the run spent: the model folder then carries the metadata of the model it holds, and
    ``configs/metadata.json`` stays as released. The copy is written atomically (ranks of a ``torchrun`` job
    may both build it).
    """
    src, out_dir = os.fspath(meta_file), os.fspath(out_dir)
    if not os.path.isfile(src):
        raise ValueError(error_message("meta_file", "an existing metadata.json", src))
    with open(src) as f:
        meta = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, "metadata.json")
    if os.path.abspath(dst) == os.path.abspath(src):
        raise ValueError(error_message("out_dir", "another folder than the one holding `meta_file`", out_dir,
                                       "Write run outputs under models/."))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".metadata-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=4)
    os.replace(tmp, dst)
    return dst
