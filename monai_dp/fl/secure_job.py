"""Secure aggregation with distributed DP noise on NVIDIA FLARE, with NVFlare's homomorphic encryption (TenSEAL CKKS).

The job is NVFlare's HE FedAvg layout (``nvflare.app_opt.he``): sites encrypt their result with ``HEModelEncryptor``
(a task-result filter) and decrypt the global model with ``HEModelDecryptor`` (a task-data filter); the server runs
``ScatterAndGather`` with ``HEInTimeAccumulateWeightedAggregator`` and ``HEModelShareableGenerator``, which add
ciphertexts and keep the global model encrypted, and persists it through ``HEModelSerializeFilter``. The server's
TenSEAL context has no secret key. What this module adds:

* :class:`SecureSumAggregator`: NVFlare's HE aggregator that records the type and size of everything it receives,
  refuses a plaintext value, a site that sent its update in the clear, and a sum of fewer than ``min_sites`` updates;
* :class:`SecureScatterAndGather`: sends each round's task only to the sites still within their budget, accounts the
  aggregate-level guarantee every round (:class:`~monai_dp.fl.secure.DistributedNoise`), asks the aggregate-level
  budget before every round (the first included) and keeps its account across jobs (:mod:`monai_dp.fl.accounts`),
  ends the federation when fewer than t sites remain, and writes the federation report;
* :func:`secure_fedavg_recipe`: the job; :func:`provision_simulation`: the TenSEAL contexts for NVFlare's simulator,
  made with NVFlare's provisioning builder (``nvflare.lighter.impl.he.HEBuilder``).

NVFlare's own ``FedAvgRecipeWithHE`` refuses the simulator because the contexts come from provisioned startup kits;
the components themselves run there once the contexts are in place (see docs/secure_aggregation.md).

Command line (simulator)::

    python -m monai_dp.fl.secure_job --bundle_root bundles/dp_classification_2d --sites site-1 site-2 site-3 \
        --num_rounds 3 --clip_norm 0.1 --target_epsilon 8 --min_sites 2 --site_config sites.json --workspace ws
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

try:
    import tenseal as ts
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("Secure aggregation needs TenSEAL (NVFlare's homomorphic encryption): "
                      "pip install 'monai_dp[he]'.") from err
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.he.intime_accumulate_model_aggregator import (
    HEInTimeAccumulateWeightedAggregator,
)

from monai_dp.fl.accounts import account_file, load_account, require_round, save_account
from monai_dp.fl.algo import FLPrivacyKeys
from monai_dp.fl.job import _allow_components as allow_components
from monai_dp.fl.secure import DistributedNoise
from monai_dp.fl.secure_client import SECURE_KEY

__all__ = ["CLIENT_CONTEXT", "SERVER_CONTEXT", "SecureScatterAndGather", "SecureSumAggregator", "main",
           "provision_simulation", "run_secure_simulation", "secure_fedavg_recipe"]

CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "secure_client.py")
SERVER_CONTEXT, CLIENT_CONTEXT = "server_context.tenseal", "client_context.tenseal"  # NVFlare's provisioning names
SECURE_CLASS_ALLOW_LIST = ("monai_dp.fl.secure_job.SecureScatterAndGather",
                           "monai_dp.fl.secure_job.SecureSumAggregator")


class SecureSumAggregator(HEInTimeAccumulateWeightedAggregator):
    """NVFlare's HE aggregator (ciphertexts added, averaged with unit weights) that records what reaches it.

    ``received`` holds, per site of the current round, the type name of every value and the bytes of its
    ciphertexts; ``reports`` the site's privacy reports. A value that is not a CKKS ciphertext is refused (the
    site's result is not aggregated), and :meth:`aggregate` refuses a sum of fewer than ``min_sites`` updates.
    """

    def __init__(self, min_sites: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("expected_data_kind", DataKind.WEIGHT_DIFF)
        super().__init__(**kwargs)
        self.min_sites = int(min_sites)
        self.received: dict[str, dict] = {}
        self.reports: dict[str, dict] = {}
        self.accepted_sites: list[str] = []

    def accept(self, shareable: Any, fl_ctx: Any) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        dxo = from_shareable(shareable)
        data = dxo.data or {}
        types = {name: type(value).__name__ for name, value in data.items()}
        plain = sorted(name for name, value in data.items() if not isinstance(value, ts.CKKSVector))
        size = sum(len(v.serialize()) for v in data.values() if isinstance(v, ts.CKKSVector))
        self.received[site] = {"types": types, "ciphertext_bytes": size, "plaintext": plain,
                               "values": sum(v.size() for v in data.values() if isinstance(v, ts.CKKSVector))}
        self.reports[site] = {"privacy": dxo.get_meta_prop(FLPrivacyKeys.PRIVACY),
                              "exhausted": bool(dxo.get_meta_prop(FLPrivacyKeys.EXHAUSTED, False)),
                              "secure": dxo.get_meta_prop(SECURE_KEY)}
        if not data:
            self.log_info(fl_ctx, f"Site {site} sent no update this round; it is not part of the sum.")
            return False
        if plain:
            self.log_error(fl_ctx, f"Site {site} sent {len(plain)} values in the clear ({plain[:3]}...): refused; "
                                   "only CKKS ciphertexts are aggregated.")
            return False
        accepted = super().accept(shareable, fl_ctx)
        if accepted:
            self.accepted_sites.append(site)
        return accepted

    def aggregate(self, fl_ctx: Any) -> Any:
        if len(self.accepted_sites) < self.min_sites:
            raise RuntimeError(
                f"`sites aggregated` must be at least min_sites={self.min_sites}, got {len(self.accepted_sites)} "
                f"({self.accepted_sites}); the noise shares of fewer sites do not add up to the accounted σC.")
        return super().aggregate(fl_ctx)

    def reset(self, fl_ctx: Any) -> None:
        super().reset(fl_ctx)
        self.received, self.reports, self.accepted_sites = {}, {}, []


class SecureScatterAndGather(ScatterAndGather):
    """``ScatterAndGather`` for DP sites and secure aggregation with distributed noise.

    Args:
        secure: arguments of :class:`~monai_dp.fl.secure.DistributedNoise` (``num_sites`` defaults to the sites
            connected when the run starts), plus ``ckks_error``: the measured CKKS error of a decrypted sum.
        report_file: the federation report (JSON); a relative path is under the server's run folder.
        federation_id: the aggregate-level account this job continues (:mod:`monai_dp.fl.accounts`, kept under the
            server's workspace root); a new id starts a new account.
        args, kwargs: those of ``ScatterAndGather``.
    """

    def __init__(self, *args: Any, secure: dict | None = None, report_file: str = "federation_report.json",
                 federation_id: str = "dp_secure_fedavg", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secure = dict(secure or {})
        self.report_file = report_file
        self.federation_id = federation_id
        self.account_file: str | None = None
        self.noise: DistributedNoise | None = None
        self.stopped: dict[str, int] = {}
        self.rounds: list[dict] = []
        self.ended_early: str | None = None

    def start_controller(self, fl_ctx: Any) -> None:
        super().start_controller(fl_ctx)
        args = {k: v for k, v in self.secure.items() if k != "ckks_error"}
        args.setdefault("num_sites", len(self._engine.get_clients()))
        self.noise = DistributedNoise(**args)
        self.started = time.time()
        self.open_account(fl_ctx)

    def open_account(self, fl_ctx: Any) -> None:
        """Continue the federation's aggregate-level account from the server's workspace, and refuse to start when
        not even the first round fits the aggregate-level budget."""
        root = fl_ctx.get_engine().get_workspace().get_root_dir()
        self.account_file = account_file(root, self.federation_id)
        state = load_account(self.account_file, self.federation_id, "secure_aggregation")
        if state is not None:
            self.noise.load_accounting_state(state)
        self.log_info(fl_ctx, f"Aggregate-level account of federation_id={self.federation_id!r} kept in "
                              f"{self.account_file}: {self.noise.rounds} earlier rounds, ε = "
                              f"{self.noise.get_epsilon():.4f}; a new federation_id starts a new account.")
        require_round(self.noise, "aggregate-level")

    def live_sites(self) -> list[str]:
        return [c.name for c in self._engine.get_clients() if c.name not in self.stopped]

    def broadcast_and_wait(self, task: Any, fl_ctx: Any, targets: Any = None, min_responses: int = 1,
                           wait_time_after_min_received: int = 0, abort_signal: Any = None) -> None:
        """The round's task goes to the sites still within their budget; at least t of them must answer. The
        aggregate-level budget is asked first: a round that would exceed it is not started."""
        require_round(self.noise, "aggregate-level")
        live = self.live_sites()
        self.log_info(fl_ctx, f"Round {self._current_round}: sites {live}; stopped: {self.stopped}")
        super().broadcast_and_wait(task=task, fl_ctx=fl_ctx, targets=live,
                                   min_responses=min(self.noise.min_sites, len(live)),
                                   wait_time_after_min_received=wait_time_after_min_received,
                                   abort_signal=abort_signal)

    def handle_event(self, event_type: str, fl_ctx: Any) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.ROUND_DONE and self.noise is not None:
            self._round_done(fl_ctx)

    def _round_done(self, fl_ctx: Any) -> None:
        agg = self.aggregator
        self.noise.record_round(len(agg.accepted_sites))
        save_account(self.account_file, self.federation_id, "secure_aggregation", self.noise.accounting_state())
        for site, rep in agg.reports.items():
            if rep["exhausted"]:
                self.stopped.setdefault(site, self._current_round)
        values = max((r["values"] for r in agg.received.values()), default=0)
        self.rounds.append({"round": self._current_round, "aggregated": list(agg.accepted_sites),
                            "received": dict(agg.received),
                            "sites": {s: r["privacy"] for s, r in agg.reports.items()},
                            "site_noise": {s: r["secure"] for s, r in agg.reports.items()},
                            "aggregate": self.noise.report(values or None, self.secure.get("ckks_error"))})
        self.log_info(fl_ctx, f"Round {self._current_round}: aggregate-level ε = {self.noise.get_epsilon():.4f} "
                              f"(δ = {self.noise.delta:.3g}) over {self.noise.rounds} rounds.")
        live = self.live_sites()
        if len(live) < self.noise.min_sites and self._current_round < self._start_round + self._num_rounds - 1:
            self.ended_early = (f"after round {self._current_round}: {len(live)} sites left, fewer than "
                                f"min_sites={self.noise.min_sites}")
            self.log_info(fl_ctx, f"The federation ends {self.ended_early}.")
            self._num_rounds = self._current_round + 1 - self._start_round
        elif not self.noise.allows_round():
            self.ended_early = f"after round {self._current_round}: the aggregate-level budget is spent"
            self._num_rounds = self._current_round + 1 - self._start_round
        self.write_report(fl_ctx)

    def control_flow(self, abort_signal: Any, fl_ctx: Any) -> None:
        try:
            super().control_flow(abort_signal, fl_ctx)
        finally:
            self.write_report(fl_ctx, finished=len(self.rounds) == self._num_rounds)

    def report(self, finished: bool = False) -> dict:
        sites = sorted({s for r in self.rounds for s in r["sites"]} | set(self.stopped))
        final = {}
        last_round = self._start_round + self._num_rounds - 1
        for site in sites:
            last = next((r["sites"][site] for r in reversed(self.rounds) if r["sites"].get(site)), None)
            stopped = self.stopped.get(site)
            final[site] = {"stopped_at_round": stopped, "privacy": last,
                           "left_early": stopped is not None and stopped < last_round}
        return {"finished": finished, "num_rounds": self._num_rounds, "start_round": self._start_round,
                "rounds_run": len(self.rounds), "sites": final, "stopped": dict(self.stopped),
                "left_early": sorted(s for s, v in final.items() if v["left_early"]), "ended_early": self.ended_early,
                "rounds": self.rounds, "secure_aggregation": self.rounds[-1]["aggregate"] if self.rounds else None,
                "federation_id": self.federation_id, "account_file": self.account_file,
                "wall_time_s": round(time.time() - getattr(self, "started", time.time()), 3)}

    def write_report(self, fl_ctx: Any, finished: bool = False) -> str:
        path = self.report_file
        if not os.path.isabs(path):
            path = os.path.join(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()), path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(f"{path}.tmp", "w") as f:
            json.dump(self.report(finished), f, indent=2)
        os.replace(f"{path}.tmp", path)
        return path


# ---------------------------------------------------------------------- contexts and the job
def provision_simulation(workspace: str, name: str, poly_modulus_degree: int = 8192,
                         coeff_mod_bit_sizes: tuple = (60, 40, 40), scale_bits: int = 40) -> str:
    """TenSEAL contexts for NVFlare's simulator run of job ``name`` under ``workspace``, made by NVFlare's
    ``HEBuilder``: the server's (no secret key) in the simulator's ``startup`` folder, which the simulator copies to
    every participant, and the sites' (with the secret key) in ``<workspace>/<name>_site_keys``, outside the
    simulator's folders. Returns the sites' context file."""
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder(poly_modulus_degree=poly_modulus_degree, coeff_mod_bit_sizes=list(coeff_mod_bit_sizes),
                        scale_bits=scale_bits)
    builder.initialize(None, None)  # makes the CKKS context; the project is not used
    workspace = os.path.abspath(workspace)
    folders = {SERVER_CONTEXT: (os.path.join(workspace, name, "startup"), False),
               CLIENT_CONTEXT: (os.path.join(workspace, f"{name}_site_keys"), True)}
    for file_name, (folder, is_client) in folders.items():
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, file_name), "wb") as f:
            f.write(builder.get_serialized_context(is_client=is_client))
    return os.path.join(folders[CLIENT_CONTEXT][0], CLIENT_CONTEXT)


def _client_args(bundle_root: str, num_rounds: int, local_epochs: int, config_file: list, site_config: str | None,
                 workdir: str | None, secure: dict, debug_dir: str | None) -> str:
    args = ["--bundle_root", bundle_root, "--num_rounds", str(num_rounds), "--local_epochs", str(local_epochs),
            "--num_sites", str(secure["num_sites"]), "--min_sites", str(secure["min_sites"]),
            "--clip_norm", repr(float(secure["clip_norm"])),
            "--noise_multiplier", repr(float(secure["noise_multiplier"])),
            "--target_delta", repr(float(secure["target_delta"])), "--accountant", secure["accountant"],
            "--config_file", *config_file]
    if secure.get("noise_seed") is not None:
        args += ["--noise_seed", str(int(secure["noise_seed"]))]
    if site_config:
        args += ["--site_config", os.path.abspath(site_config)]
    if workdir:
        args += ["--workdir", os.path.abspath(workdir)]
    if debug_dir:
        args += ["--debug_dir", os.path.abspath(debug_dir)]
    return " ".join(args)


def secure_fedavg_recipe(bundle_root: str, sites: list[str], num_rounds: int, clip_norm: float,
                         noise_multiplier: float | None = None, target_epsilon: float | None = None,
                         min_sites: int | None = None, target_delta: float | None = None, accountant: str = "prv",
                         local_epochs: int = 1, config_file: list[str] | None = None, site_config: str | None = None,
                         overrides: dict | None = None, name: str = "dp_secure_fedavg",
                         client_context: str = CLIENT_CONTEXT, ckks_error: float | None = None,
                         report_file: str = "federation_report.json", workdir: str | None = None,
                         noise_seed: int | None = None, debug_dir: str | None = None,
                         federation_id: str | None = None) -> Any:
    """The job: NVFlare's HE components, :class:`SecureScatterAndGather`, :class:`SecureSumAggregator` and
    :mod:`monai_dp.fl.secure_client` at every site. σ is given, or calibrated here once for ``target_epsilon`` over
    ``num_rounds`` at q = 1, and the same σ goes to every site and to the server.

    ``client_context``: the sites' TenSEAL context (``client_context.tenseal`` in a provisioned startup kit, or the
    file :func:`provision_simulation` returns). ``federation_id`` (default: ``name``): the server's aggregate-level
    account this job continues (:mod:`monai_dp.fl.accounts`). ``noise_seed`` and ``debug_dir`` are for tests only.
    Refused when not even one round fits ``target_epsilon`` (the server asks again with the earlier jobs' rounds).
    """
    from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
    from nvflare.app_opt.he.model_serialize_filter import HEModelSerializeFilter
    from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
    from nvflare.app_opt.pt.job_config.model import PTModel
    from nvflare.job_config.defs import FilterType
    from nvflare.job_config.script_runner import ScriptRunner
    from nvflare.recipe.spec import Recipe
    from nvflare.recipe.utils import recipe_model_to_job_model

    noise = DistributedNoise(len(sites), clip_norm, noise_multiplier, min_sites, target_epsilon, target_delta,
                             num_rounds, accountant)
    require_round(noise, "aggregate-level")
    federation_id = name if federation_id is None else federation_id
    account_file("", federation_id)  # checks the id
    secure = {"num_sites": len(sites), "min_sites": noise.min_sites, "clip_norm": noise.clip_norm,
              "noise_multiplier": noise.noise_multiplier, "target_delta": noise.delta, "accountant": accountant,
              "target_epsilon": target_epsilon, "ckks_error": ckks_error}
    bundle_root = os.path.abspath(bundle_root)
    config_file = list(config_file or ["configs/train.json"])
    model = recipe_model_to_job_model({"class_path": "monai_dp.fl.job.BundleNetwork", "args": {
        "bundle_root": bundle_root, "config_file": config_file, "overrides": dict(overrides or {})}})

    job = BaseFedJob(name=name, min_clients=noise.min_sites)
    persistor = PTFileModelPersistor(model=model, filter_id="model_serialize_filter")
    job.comp_ids.update(job.to_server(PTModel(model=model, persistor=persistor)))
    job.to_server(HEModelSerializeFilter(tenseal_context_file=SERVER_CONTEXT), id="model_serialize_filter")
    aggregator_id = job.to_server(SecureSumAggregator(min_sites=noise.min_sites), id="aggregator")
    generator_id = job.to_server(HEModelShareableGenerator(tenseal_context_file=SERVER_CONTEXT),
                                 id="shareable_generator")
    job.to_server(SecureScatterAndGather(
        min_clients=noise.min_sites, num_rounds=num_rounds, wait_time_after_min_received=3600,
        aggregator_id=aggregator_id, persistor_id=job.comp_ids.get("persistor_id", ""),
        shareable_generator_id=generator_id, secure=secure, report_file=report_file, federation_id=federation_id))
    job.to_clients(ScriptRunner(script=CLIENT_SCRIPT, script_args=_client_args(
        bundle_root, num_rounds, local_epochs, config_file, site_config, workdir, dict(secure, noise_seed=noise_seed),
        debug_dir)))
    job.to_clients(HEModelDecryptor(tenseal_context_file=client_context), tasks=["train"],
                   filter_type=FilterType.TASK_DATA)
    job.to_clients(HEModelEncryptor(tenseal_context_file=client_context, weigh_by_local_iter=False,
                                    data_kinds=[DataKind.WEIGHT_DIFF]),
                   tasks=["train"], filter_type=FilterType.TASK_RESULT)
    recipe = Recipe(job)
    recipe.name = name
    recipe.secure = secure
    return recipe


def run_secure_simulation(recipe: Any, sites: list[str], workspace: str, threads: int | None = None) -> str:
    """Run ``recipe`` (made with the client context of :func:`provision_simulation` under ``workspace``) in NVFlare's
    simulator; returns the server's run folder."""
    from nvflare.recipe import SimEnv

    workspace = os.path.abspath(workspace)
    # the simulator's component policy: NVFlare's defaults plus this job's controller, aggregator and network
    allow_components(os.path.join(workspace, recipe.name), [*SECURE_CLASS_ALLOW_LIST, "monai_dp.fl.job.BundleNetwork"])
    env = SimEnv(clients=list(sites), num_threads=threads or len(sites), workspace_root=workspace)
    recipe.execute(env)
    return os.path.join(workspace, recipe.name, "server", "simulate_job")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Secure aggregation with distributed DP noise in NVFlare's simulator.")
    parser.add_argument("--bundle_root", required=True)
    parser.add_argument("--sites", nargs="+", required=True)
    parser.add_argument("--num_rounds", type=int, required=True)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--config_file", nargs="+", default=None)
    parser.add_argument("--site_config", default=None)
    parser.add_argument("--network_overrides", default=None)
    parser.add_argument("--clip_norm", type=float, required=True)
    parser.add_argument("--noise_multiplier", type=float, default=None)
    parser.add_argument("--target_epsilon", type=float, default=None)
    parser.add_argument("--target_delta", type=float, default=None)
    parser.add_argument("--min_sites", type=int, default=None)
    parser.add_argument("--accountant", default="prv")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--name", default="dp_secure_fedavg")
    parser.add_argument("--federation_id", default=None,
                        help="the server's aggregate-level account to continue (default: --name); a new id starts anew")
    parser.add_argument("--noise_seed", type=int, default=None, help="tests only")
    parser.add_argument("--debug_dir", default=None, help="tests only: sites write their noised updates in the clear")
    parser.add_argument("--export_job", action="store_true",
                        help="write the NVFlare job folder under --workspace (for provisioned sites: the startup kits "
                             "hold the contexts, nvflare.lighter.impl.he.HEBuilder) instead of simulating")
    args = parser.parse_args(argv)
    from nvflare.lighter.impl.he import HEBuilder

    from monai_dp.fl.secure import measure_ckks_error

    if args.export_job:  # the error depends on the CKKS parameters and the values, not on the key: measure it here
        builder = HEBuilder()
        builder.initialize(None, None)
        client_context, context = CLIENT_CONTEXT, ts.context_from(builder.get_serialized_context(is_client=True))
    else:
        client_context = provision_simulation(args.workspace, args.name)
        with open(client_context, "rb") as f:
            context = ts.context_from(f.read())
    noise = DistributedNoise(len(args.sites), args.clip_norm, args.noise_multiplier, args.min_sites,
                             args.target_epsilon, args.target_delta, args.num_rounds, args.accountant)
    # values of the size the sites encrypt (|clipped coordinate| <= C, plus the share's noise): the error grows with it
    ckks_error = measure_ckks_error(context, len(args.sites), value_std=noise.clip_norm + noise.share_std)
    import importlib

    # the job's classes by their module path (not __main__'s copies), as NVFlare writes them into the job
    job_module = importlib.import_module("monai_dp.fl.secure_job")
    recipe = job_module.secure_fedavg_recipe(
        args.bundle_root, args.sites, args.num_rounds, args.clip_norm, noise.noise_multiplier, args.target_epsilon,
        args.min_sites, args.target_delta, args.accountant, args.local_epochs, args.config_file, args.site_config,
        json.loads(args.network_overrides) if args.network_overrides else None, name=args.name,
        client_context=client_context, ckks_error=ckks_error, workdir=args.workspace, noise_seed=args.noise_seed,
        debug_dir=args.debug_dir, federation_id=args.federation_id)
    if args.export_job:
        recipe.export(os.path.abspath(args.workspace))
        print(os.path.join(os.path.abspath(args.workspace), args.name))
        return 0
    print(job_module.run_secure_simulation(recipe, args.sites, args.workspace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
