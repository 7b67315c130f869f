"""A federated DP job on NVIDIA FLARE: any DP bundle across N sites, FedAvg on the server, DP-SGD at every site.

Python::

    from monai_dp.fl.job import dp_fedavg_recipe
    recipe = dp_fedavg_recipe("bundles/dp_classification_2d", sites=["site-1", "site-2"], num_rounds=3,
                              site_config="sites.json")
    recipe.execute(SimEnv(clients=["site-1", "site-2"]))   # or PocEnv / ProdEnv for real sites

Command line (NVFlare's simulator, real server and client processes on one machine)::

    python -m monai_dp.fl.job --bundle_root bundles/dp_classification_2d --sites site-1 site-2 \
        --num_rounds 3 --site_config sites.json --workspace fl_workspace
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
from torch import nn

__all__ = ["DP_CLASS_ALLOW_LIST", "TB_FOLDER", "BundleNetwork", "dp_fedavg_recipe", "main", "run_simulation"]

CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client.py")
TB_FOLDER = "tb_events"  # the server's TensorBoard folder, inside its job folder
# components of this job that NVFlare's component policy must allow (besides its own defaults)
DP_CLASS_ALLOW_LIST = ("monai_dp.fl.server.DPFedAvg",)


class BundleNetwork(nn.Module):
    """The bundle's ``network_def`` as the server's initial global model; its state dict has the keys of the
    bundle's network (what every site's trainer loads)."""

    def __init__(self, bundle_root: str, config_file: list | str = "configs/train.json", overrides: dict | None = None,
                 network_id: str = "network_def") -> None:
        super().__init__()
        from monai.bundle import ConfigParser

        files = [config_file] if isinstance(config_file, str) else list(config_file)
        parser = ConfigParser()
        parser.read_config([f if os.path.isabs(f) else os.path.join(bundle_root, f) for f in files])
        parser.update({"bundle_root": bundle_root, **(overrides or {})})
        self.net = parser.get_parsed_content(network_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


def dp_fedavg_recipe(bundle_root: str, sites: list[str], num_rounds: int, local_epochs: int = 1,
                     config_file: list[str] | None = None, site_config: str | None = None,
                     overrides: dict | None = None, name: str = "dp_fedavg",
                     report_file: str = "federation_report.json", workdir: str | None = None,
                     client_level: dict | None = None, tensorboard: bool | None = None) -> Any:
    """An NVFlare ``FedAvgRecipe`` whose controller is :class:`~monai_dp.fl.server.DPFedAvg` and whose sites run
    :mod:`monai_dp.fl.client` (the bundle through :class:`~monai_dp.fl.algo.DPMonaiAlgo`).

    ``overrides`` apply to the server's copy of the network (keep them equal to the sites' network overrides);
    each site's own settings (budget, ledger, dataset id, outputs, bundle overrides) are in ``site_config``.
    ``client_level``: arguments of :class:`~monai_dp.fl.client_level.ClientLevelDP` to add client-level DP-FedAvg
    at the server (for federations of tens of sites or more).
    ``tensorboard``: attach NVFlare's TensorBoard receiver to the server, which then writes every site's ε, δ and
    steps per round (logged by the sites through ``nvflare.client.tracking``) under ``tb_events/<site>`` in the
    server's job folder; ``None`` (default) attaches it when the ``tensorboard`` package is installed.
    """
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    from monai_dp.fl.server import DPFedAvg

    bundle_root = os.path.abspath(bundle_root)
    config_file = list(config_file or ["configs/train.json"])
    args = ["--bundle_root", bundle_root, "--num_rounds", str(num_rounds), "--local_epochs", str(local_epochs),
            "--config_file", *config_file]
    if site_config:
        args += ["--site_config", os.path.abspath(site_config)]
    if workdir:
        args += ["--workdir", os.path.abspath(workdir)]

    class _Recipe(FedAvgRecipe):
        def _create_controller(self, persistor_id: str, model_params: Any, model_aggregator: Any) -> Any:
            return DPFedAvg(num_clients=self.min_clients, num_rounds=self.num_rounds, persistor_id=persistor_id,
                            model=model_params, aggregator=model_aggregator, task_name="train",
                            report_file=report_file, client_level=client_level)

    model = {"class_path": "monai_dp.fl.job.BundleNetwork",
             "args": {"bundle_root": bundle_root, "config_file": config_file, "overrides": dict(overrides or {})}}
    recipe = _Recipe(name=name, model=model, min_clients=len(sites), num_rounds=num_rounds,
                     train_script=CLIENT_SCRIPT, train_args=" ".join(args))
    if tensorboard is None:
        import importlib.util

        tensorboard = importlib.util.find_spec("tensorboard") is not None
    if tensorboard:
        from nvflare.recipe.utils import add_experiment_tracking

        add_experiment_tracking(recipe, "tensorboard", {"tb_folder": TB_FOLDER})
    return recipe


def _allow_components(workspace: str, classes: tuple[str, ...] | list[str] = DP_CLASS_ALLOW_LIST) -> None:
    """The simulator's component policy: NVFlare's defaults plus ``classes`` (this job's controller)."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
    from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST

    local = os.path.join(workspace, "local")
    os.makedirs(local, exist_ok=True)
    path = os.path.join(local, "resources.json.default")
    resources = {"format_version": 2}
    if os.path.isfile(path):
        with open(path) as f:
            resources = json.load(f)
    resources[CLASS_ALLOW_LIST] = sorted(set(resources.get(CLASS_ALLOW_LIST, DEFAULT_CLASS_ALLOW_LIST))
                                         | set(classes))
    with open(path, "w") as f:
        json.dump(resources, f, indent=2)


def run_simulation(recipe: Any, sites: list[str], workspace: str, threads: int | None = None) -> str:
    """Run ``recipe`` in NVFlare's simulator (a server and one client per site); returns the job's folder."""
    from nvflare.recipe import SimEnv

    workspace = os.path.abspath(workspace)
    _allow_components(os.path.join(workspace, recipe.job.name if hasattr(recipe, "job") else "dp_fedavg"))
    env = SimEnv(clients=list(sites), num_threads=threads or len(sites), workspace_root=workspace)
    run = recipe.execute(env)
    return run.get_result() if hasattr(run, "get_result") else os.path.join(workspace, recipe.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Federated DP training of a MONAI bundle in NVFlare's simulator.")
    parser.add_argument("--bundle_root", required=True)
    parser.add_argument("--sites", nargs="+", required=True, help="site names, e.g. site-1 site-2")
    parser.add_argument("--num_rounds", type=int, required=True)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--config_file", nargs="+", default=None)
    parser.add_argument("--site_config", default=None, help="JSON: per-site budget, ledger, dataset id, overrides")
    parser.add_argument("--network_overrides", default=None, help="JSON: overrides of the server's network")
    parser.add_argument("--client_level", default=None,
                        help='JSON: client-level DP-FedAvg at the server, e.g. {"sample_rate": 0.1, "clip_norm": 1.0, '
                             '"target_epsilon": 3.0}')
    parser.add_argument("--workspace", required=True, help="the simulator's workspace (or the exported job's parent)")
    parser.add_argument("--name", default="dp_fedavg")
    parser.add_argument("--export_job", action="store_true",
                        help="write the NVFlare job folder under --workspace instead of simulating (for PoC/real sites)")
    args = parser.parse_args(argv)
    overrides = json.loads(args.network_overrides) if args.network_overrides else None
    recipe = dp_fedavg_recipe(args.bundle_root, args.sites, args.num_rounds, args.local_epochs, args.config_file,
                              args.site_config, overrides, name=args.name, workdir=args.workspace,
                              client_level=json.loads(args.client_level) if args.client_level else None)
    if args.export_job:
        recipe.export(os.path.abspath(args.workspace))
        print(os.path.join(os.path.abspath(args.workspace), args.name))
        return 0
    print(run_simulation(recipe, args.sites, args.workspace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
