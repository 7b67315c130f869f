"""The site's training script under NVFlare's Client API: a DP bundle through :class:`DPMonaiAlgo`, one round per task.

Run by the job's ``ScriptRunner`` (see :mod:`monai_dp.fl.job`), not by hand::

    --bundle_root B --num_rounds R --local_epochs E [--config_file train.json ...] [--site_config sites.json]

``--site_config`` is a JSON file ``{"<site name>": {"target_epsilon": ..., "ledger": ..., "dataset_id": ...,
"output_dir": ..., "overrides": {...}}, ...}``; each site reads its own entry (by its NVFlare site name).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

__all__ = ["DELTA_TAG", "EPSILON_TAG", "STEPS_TAG", "log_privacy", "main", "round_result", "site_settings"]

logger = logging.getLogger("monai_dp.fl.client")

# TensorBoard tags of the privacy spent, streamed to the server's receiver (one point per round, step = round)
EPSILON_TAG, DELTA_TAG, STEPS_TAG = "dp/epsilon", "dp/delta", "dp/steps"

SITE_KEYS = ("target_epsilon", "ledger", "dataset_id", "output_dir", "overrides", "allow_validation_metrics",
             "allow_nonprivate_statistics")


def site_settings(site_config: str | None, site: str) -> dict:
    """The entry of ``site`` in the JSON file ``site_config`` (``{}`` without a file); unknown keys are refused."""
    if not site_config:
        return {}
    with open(site_config) as f:
        sites = json.load(f)
    entry = sites.get(site, {}) if isinstance(sites, dict) else None
    if not isinstance(entry, dict):
        raise TypeError(f"`site_config[{site!r}]` must be a JSON object, got {type(entry).__name__}.")
    unknown = sorted(set(entry) - set(SITE_KEYS))
    if unknown:
        raise ValueError(f"`site_config[{site!r}]` keys must be among {list(SITE_KEYS)}, got {unknown!r}.")
    return entry


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle_root", required=True)
    parser.add_argument("--config_file", nargs="+", default=["configs/train.json"])
    parser.add_argument("--num_rounds", type=int, required=True)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--site_config", default=None)
    parser.add_argument("--workdir", default=None, help="parent of the sites' output folders (default: cwd)")
    return parser.parse_args(argv)


def round_result(algo: Any, global_round: int | None, trained: bool = True) -> Any:
    """The FLModel a site sends after a round: its weight difference, the executed steps, its privacy report
    (``params`` empty when it took no step: its budget was spent before the round)."""
    from monai.fl.utils.constants import FlStatistics
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from monai_dp.fl.algo import FLPrivacyKeys

    report = algo.privacy_report()
    meta = {FLPrivacyKeys.PRIVACY: report, FLPrivacyKeys.EXHAUSTED: report["budget_exhausted"],
            FLPrivacyKeys.ROUND: global_round}
    if not trained:
        return FLModel(params={}, meta=meta, current_round=global_round)
    weights = algo.get_weights()
    steps = int((weights.statistics or {}).get(FlStatistics.NUM_EXECUTED_ITERATIONS, 0))
    if steps == 0:  # nothing trained this round (budget spent before its first step): nothing to average
        return FLModel(params={}, meta=meta, current_round=global_round)
    meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] = steps
    params = {k: v.detach().cpu() for k, v in weights.weights.items()}
    params_type = ParamsType.DIFF if algo.send_weight_diff else ParamsType.FULL
    return FLModel(params=params, params_type=params_type, meta=meta, current_round=global_round)


def log_privacy(writer: Any, privacy: dict, global_round: int) -> None:
    """ε, δ and the steps taken so far, through NVFlare's experiment tracking (the server writes them to
    TensorBoard when the job has a receiver, see :func:`monai_dp.fl.job.dp_fedavg_recipe`)."""
    writer.add_scalar(EPSILON_TAG, float(privacy["epsilon"]), global_step=global_round)
    writer.add_scalar(DELTA_TAG, float(privacy["delta"]), global_step=global_round)
    writer.add_scalar(STEPS_TAG, float(privacy["steps"]), global_step=global_round)


def main(argv: list[str] | None = None) -> None:
    import nvflare.client as flare
    import torch
    from monai.fl.utils.constants import ExtraItems
    from monai.fl.utils.exchange_object import ExchangeObject
    from nvflare.client.tracking import SummaryWriter

    from monai_dp.fl.algo import DPMonaiAlgo

    args = _parse(argv)
    flare.init()
    site = flare.get_site_name()
    settings = site_settings(args.site_config, site)
    settings.setdefault("output_dir", os.path.join(args.workdir or os.getcwd(), f"{site}_outputs"))
    algo = DPMonaiAlgo(bundle_root=os.path.abspath(args.bundle_root), num_rounds=args.num_rounds,
                       local_epochs=args.local_epochs, config_train_filename=args.config_file, **settings)
    algo.initialize(extra={ExtraItems.CLIENT_NAME: site})
    writer = SummaryWriter()
    try:
        while flare.is_running():
            model = flare.receive()
            if model is None:
                break
            if not flare.is_train():
                raise RuntimeError(f"`task` must be a training task for a DP site, got {flare.get_task_name()!r}.")
            weights = {k: torch.as_tensor(v) for k, v in model.params.items()}
            trained = not algo.budget_exhausted
            if trained:
                algo.train(ExchangeObject(weights=weights))
            result = round_result(algo, model.current_round, trained)
            priv = result.meta["dp_privacy"]
            logger.info("%s round %s: ε = %.4f (δ = %.3g) after %d steps; budget exhausted: %s.", site,
                        model.current_round, priv["epsilon"], priv["delta"], priv["steps"], priv["budget_exhausted"])
            log_privacy(writer, priv, int(model.current_round or 0))
            flare.send(result)
            if priv["budget_exhausted"]:
                logger.info("%s: privacy budget spent; leaving the federation after round %s.", site,
                            model.current_round)
                break
    finally:
        algo.finalize()


if __name__ == "__main__":
    main()
