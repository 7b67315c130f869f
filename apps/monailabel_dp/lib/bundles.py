"""The DP bundles this app serves: where they are found, and the working copy each model trains in.

MONAI Label's bundle tasks write into the bundle folder (``models/`` with the weights, the run report, the
synthetic data a bundle would otherwise generate). So the app never trains in the repository's ``bundles/``:
each model gets a working copy under the app's model folder (``--conf model_dir``, default ``<app>/model``),
whose ``configs/`` and ``docs/`` are refreshed from the source bundle at every start while its ``models/``
(weights, reports) is kept.
"""

from __future__ import annotations

import logging
import os
import shutil

from monai_dp.utils.validation import error_message

__all__ = ["bundle_copies", "conf_path"]

logger = logging.getLogger(__name__)

_COPIED = ("configs", "docs", "LICENSE")


def conf_path(conf: dict, key: str, default: str) -> str:
    """The absolute path ``conf[key]`` (a ``--conf`` value), or ``default``."""
    value = conf.get(key) or default
    return os.path.realpath(os.path.expanduser(value))


def _available(bundles_dir: str) -> list[str]:
    if not os.path.isdir(bundles_dir):
        raise ValueError(error_message("bundles", "a folder holding the DP bundles", bundles_dir,
                                       "Pass `--conf bundles <repository>/bundles`."))
    return sorted(n for n in os.listdir(bundles_dir)
                  if os.path.isfile(os.path.join(bundles_dir, n, "configs", "train.json")))


def _refresh(src: str, dst: str) -> None:
    os.makedirs(os.path.join(dst, "models"), exist_ok=True)
    for name in _COPIED:
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(s, d)
        elif os.path.isfile(s):
            shutil.copy2(s, d)


def bundle_copies(app_dir: str, conf: dict) -> dict[str, str]:
    """``{model name: working copy}`` for the bundles named by ``--conf models`` (comma-separated, or ``all``)."""
    bundles_dir = conf_path(conf, "bundles", os.path.join(app_dir, "..", "..", "bundles"))
    model_dir = conf_path(conf, "model_dir", os.path.join(app_dir, "model"))
    available = _available(bundles_dir)
    names = [n.strip() for n in str(conf.get("models", "")).split(",") if n.strip()]
    if names == ["all"]:
        names = available
    unknown = [n for n in names if n not in available]
    if not names or unknown:
        raise ValueError(error_message("models", f"a comma-separated list of bundles in {bundles_dir!r} "
                                       f"({', '.join(available)}) or 'all'", conf.get("models"),
                                       "Pass e.g. `--conf models dp_segmentation_3d`."))
    copies = {}
    for name in names:
        copies[name] = os.path.join(model_dir, name)
        _refresh(os.path.join(bundles_dir, name), copies[name])
        logger.info("DP bundle %s: working copy %s", name, copies[name])
    return copies
