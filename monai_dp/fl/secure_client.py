"""A site's training script for secure aggregation under NVFlare's Client API (run by the job's ``ScriptRunner``).

Each round: DP-SGD through :class:`~monai_dp.fl.algo.DPMonaiAlgo` (the site's sample-level guarantee, unchanged), then
the round's weight difference clipped to C with the site's noise share added (:class:`~monai_dp.fl.secure.
DistributedNoise`); NVFlare's ``HEModelEncryptor`` (a task-result filter of the job) encrypts it before it leaves
the site and ``HEModelDecryptor`` decrypts the global model that comes back. See :mod:`monai_dp.fl.secure_job`.

Arguments: those of :mod:`monai_dp.fl.client` plus ``--num_sites --min_sites --clip_norm --noise_multiplier
--target_delta --accountant`` (the same at every site and at the server) and, for tests only, ``--noise_seed`` and
``--debug_dir`` (the site writes its noised updates and the decrypted global models there, in the clear).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import zlib
from typing import Any

__all__ = ["SECURE_KEY", "ledger_note", "main", "secure_result", "with_ledger_note"]

logger = logging.getLogger("monai_dp.fl.secure_client")

SECURE_KEY = "dp_secure_aggregation"  # FLModel.meta: the aggregate-level report of the site's noise share


def ledger_note(noise: Any) -> str:
    """What the site's ledger records with each of its runs: which guarantees the run holds, and a test noise seed."""
    n, t = noise.num_sites, noise.min_sites
    seed = noise.central.noise_seed
    return (f"federated, secure aggregation with distributed noise: site-level DP-SGD (this run's sigma, q, steps); "
            f"each round's update clipped to C={noise.clip_norm:g} with a noise share of std {noise.share_std:.6g} "
            f"(aggregate sigma={noise.noise_multiplier:.6g}, n={n}, t={t}: against the server and coalitions of at "
            f"most k_min - {t} sites, k_min the fewest sites summed in any round (the server's federation report; "
            f"{n - t} when all {n} sites were summed every round); an individual update "
            f"sigma={noise.noise_multiplier / t ** 0.5:.6g})"
            + ("" if seed is None else f"; noise share seeded with noise_seed={int(seed)} (TESTS ONLY: the share is "
                                       "reproducible by whoever knows the seed)"))


def with_ledger_note(bundle_root: str, config_file: list[str], overrides: dict, note: str) -> dict:
    """``overrides`` with a ``PrivacyLedgerHandler`` carrying ``note`` appended to the bundle's ``train#handlers``
    (the trainer then adds no ledger handler of its own); unchanged when the site keeps no ledger."""
    from monai.bundle import ConfigParser

    out = dict(overrides)
    if "train#handlers" in out:
        handlers = list(out["train#handlers"])
    else:
        parser = ConfigParser()
        parser.read_config([os.path.join(bundle_root, f) for f in config_file])
        handlers = list(parser.get("train#handlers", []))
    handlers.append({"_target_": "monai_dp.handlers.PrivacyLedgerHandler", "ledger": "@ledger", "note": note,
                     "register": "@train#trainer#register_dataset"})
    out["train#handlers"] = handlers
    return out


def secure_result(result: Any, noise: Any, debug_dir: str | None = None, site: str = "") -> Any:
    """The FLModel ``result`` with its update clipped and noised (float64), and the aggregate-level report in its
    meta; an empty update (no step this round) stays empty: the site is not part of the round's sum."""
    import torch
    from nvflare.apis.fl_constant import FLMetaKey

    from monai_dp.fl.algo import FLPrivacyKeys

    report = noise.report()
    result.meta[SECURE_KEY] = report
    # unit weights: NVFlare's HE aggregator divides the sum by the sites' weights, and a site's weight must not
    # depend on its data (its steps are in its privacy report)
    result.meta.pop(FLMetaKey.NUM_STEPS_CURRENT_ROUND, None)
    if not result.params:
        return result
    # the norm before clipping stays at the site: it is not covered by the noise
    noised, _ = noise.privatize({k: torch.as_tensor(v) for k, v in result.params.items()})
    result.params = noised
    if debug_dir:  # tests only: the noised update, in the clear, in a folder of the site's
        folder = os.path.join(debug_dir, site)
        os.makedirs(folder, exist_ok=True)
        torch.save(noised, os.path.join(folder, f"update_{result.meta.get(FLPrivacyKeys.ROUND)}.pt"))
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle_root", required=True)
    parser.add_argument("--config_file", nargs="+", default=["configs/train.json"])
    parser.add_argument("--num_rounds", type=int, required=True)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--site_config", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--num_sites", type=int, required=True)
    parser.add_argument("--min_sites", type=int, default=None)
    parser.add_argument("--clip_norm", type=float, required=True)
    parser.add_argument("--noise_multiplier", type=float, required=True)
    parser.add_argument("--target_delta", type=float, default=None)
    parser.add_argument("--accountant", default="prv")
    parser.add_argument("--noise_seed", type=int, default=None, help="tests only")
    parser.add_argument("--debug_dir", default=None, help="tests only: noised updates written in the clear")
    return parser.parse_args(argv)


def _dump_global(debug_dir: str | None, site: str, current_round: Any, params: dict) -> None:
    if not debug_dir:
        return
    import numpy as np
    import torch

    folder = os.path.join(debug_dir, site)
    os.makedirs(folder, exist_ok=True)
    flat = {k: torch.as_tensor(np.asarray(v, dtype=np.float64).ravel()) for k, v in params.items()}
    torch.save(flat, os.path.join(folder, f"global_{current_round}.pt"))


def main(argv: list[str] | None = None) -> None:
    import nvflare.client as flare
    import torch
    from monai.fl.utils.constants import ExtraItems
    from monai.fl.utils.exchange_object import ExchangeObject
    from nvflare.client.tracking import SummaryWriter

    from monai_dp.fl.algo import DPMonaiAlgo, FLPrivacyKeys
    from monai_dp.fl.client import log_privacy, round_result, site_settings
    from monai_dp.fl.secure import DistributedNoise

    args = _parse(argv)
    flare.init()
    site = flare.get_site_name()
    seed = None if args.noise_seed is None else args.noise_seed + zlib.crc32(site.encode())  # shares independent
    noise = DistributedNoise(args.num_sites, args.clip_norm, args.noise_multiplier, args.min_sites,
                             target_delta=args.target_delta, accountant=args.accountant, noise_seed=seed)
    settings = site_settings(args.site_config, site)
    settings.setdefault("output_dir", os.path.join(args.workdir or os.getcwd(), f"{site}_outputs"))
    bundle_root = os.path.abspath(args.bundle_root)
    if settings.get("ledger"):
        settings["overrides"] = with_ledger_note(bundle_root, args.config_file, settings.get("overrides") or {},
                                                 ledger_note(noise))
    algo = DPMonaiAlgo(bundle_root=bundle_root, num_rounds=args.num_rounds, local_epochs=args.local_epochs,
                       config_train_filename=args.config_file, **settings)
    algo.initialize(extra={ExtraItems.CLIENT_NAME: site})
    writer = SummaryWriter()
    logger.info("%s: secure aggregation, %s", site, json.dumps(noise.report()))
    try:
        while flare.is_running():
            model = flare.receive()
            if model is None:
                break
            if not flare.is_train():
                raise RuntimeError(f"`task` must be a training task for a DP site, got {flare.get_task_name()!r}.")
            _dump_global(args.debug_dir, site, model.current_round, model.params)
            weights = {k: torch.as_tensor(v) for k, v in model.params.items()}  # MonaiAlgo reshapes flat vectors
            trained = not algo.budget_exhausted
            if trained:
                algo.train(ExchangeObject(weights=weights))
            result = round_result(algo, model.current_round, trained)
            noise.record_round()  # the site's view of the aggregate's accounting (its update is in the sum or not)
            result = secure_result(result, noise, args.debug_dir, site)
            priv = result.meta[FLPrivacyKeys.PRIVACY]
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
