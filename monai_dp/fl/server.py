"""DPFedAvg: NVFlare's FedAvg controller for sites that train with DP-SGD, each under its own budget.

A site whose budget is spent says so with its last update (``FLModel.meta["dp_budget_exhausted"]``); the server
averages that update, leaves the site out of later rounds and goes on with the others; the federation ends early
when no site is left. After every round the federation report (JSON) records each site's privacy report and
which site stopped at which round.

With ``client_level`` the server also applies client-level DP-FedAvg (:class:`~monai_dp.fl.client_level.ClientLevelDP`):
sites are Poisson-sampled each round, each update (a weight difference) is clipped, the sum is noised and divided by
the expected number of sites, every round is accounted and the federation stops before a round would exceed the
client-level budget: the budget is asked before every round, the first included, and the client-level account is
kept across jobs under the server's workspace root (:mod:`monai_dp.fl.accounts`, ``client_level["federation_id"]``,
default: the job's name).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from nvflare.app_common.workflows.fedavg import FedAvg

from monai_dp.fl.algo import FLPrivacyKeys

__all__ = ["DPFedAvg"]


class DPFedAvg(FedAvg):
    """``nvflare.app_common.workflows.fedavg.FedAvg`` that follows each site's privacy budget.

    Args:
        report_file: the federation report; a relative path is under the server's run folder.
        client_level: arguments of :class:`~monai_dp.fl.client_level.ClientLevelDP` (``num_sites`` defaults to
            the number of sites connected when the run starts) to add client-level DP-FedAvg, plus
            ``federation_id``: the account it continues (default: the job's name; a new id starts a new account);
            ``None``: plain FedAvg of the sites' (site-level DP) updates.
        args, kwargs: those of ``FedAvg``.
    """

    def __init__(self, *args: Any, report_file: str = "federation_report.json", client_level: dict | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report_file = report_file
        # NVFlare exports a component's arguments from its attributes of the same names: keep them as given
        self.client_level = None if client_level is None else dict(client_level)
        self.client_dp: Any = None  # the ClientLevelDP mechanism, built when the run starts
        self._clipped: list = []
        self._template: Any = None
        self.stopped: dict[str, int] = {}  # site -> round of its last update (its budget was spent)
        self.rounds: list[dict] = []  # per round: {"round", "sites": {site: privacy report}, "aggregated": [...]}
        self._user_stop = self.stop_condition is not None
        if not self._user_stop:  # FedAvg asks should_stop() only with a stop condition: one that never fires
            self.stop_condition = ("", 0, lambda value, target: False)

    # ------------------------------------------------------------------ who trains
    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        if self.client_dp is not None:  # before every round's task: a round over the budget is not started
            from monai_dp.fl.accounts import require_round

            require_round(self.client_dp, "client-level")
        clients = [c for c in super().sample_clients(None) if c not in self.stopped]
        self.info(f"Sites still within their privacy budget: {clients}; stopped: {self.stopped}")
        if self.client_dp is not None:
            clients = self.client_dp.sample_sites(clients)
            self.info(f"Client-level DP: sites sampled this round (q = {self.client_dp.sample_rate}): {clients}")
        elif num_clients and num_clients < len(clients):
            clients = clients[:num_clients]
        return clients

    def send_model(self, *args: Any, **kwargs: Any) -> None:
        """ModelController's ``send_model``; no task when no site is sampled (``targets=[]`` would mean all)."""
        targets = kwargs.get("targets", args[2] if len(args) > 2 else None)
        data = kwargs.get("data", args[1] if len(args) > 1 else None)
        self._template, self._clipped = getattr(data, "params", None), []
        if targets is not None and len(targets) == 0:
            self.info(f"Round {self.current_round}: no site to send a task to.")
            return
        super().send_model(*args, **kwargs)

    def _round_entry(self) -> dict:
        if not self.rounds or self.rounds[-1]["round"] != self.current_round:
            self.rounds.append({"round": self.current_round, "sites": {}, "aggregated": []})
        return self.rounds[-1]

    def _aggregate_one_result(self, result: Any) -> bool:
        meta = result.meta or {}
        site = meta.get("client_name", "unknown")
        entry = self._round_entry()
        report = meta.get(FLPrivacyKeys.PRIVACY)
        entry["sites"][site] = report if isinstance(report, dict) else None
        if report is None:
            self.warning(f"Site {site} sent no privacy report in round {self.current_round}.")
        if meta.get(FLPrivacyKeys.EXHAUSTED):
            self.stopped.setdefault(site, self.current_round)
            self.info(f"Site {site} spent its privacy budget in round {self.current_round} "
                      f"(ε = {report.get('epsilon') if report else None}); it leaves the federation.")
        if self.client_dp is not None:
            return self._clip_one_result(result, site, entry)
        accepted = super()._aggregate_one_result(result)
        if accepted:
            entry["aggregated"].append(site)
        return accepted

    def _clip_one_result(self, result: Any, site: str, entry: dict) -> bool:
        """Client-level DP: keep the site's update clipped (a weight difference is required)."""
        from nvflare.app_common.abstract.fl_model import ParamsType

        if not result.params:
            self.warning(f"Empty result from site {site}; it counts as a sampled site with a zero update.")
            return False
        if result.params_type != ParamsType.DIFF:
            raise ValueError(f"`params_type` of site {site}'s update must be DIFF with client-level DP, got "
                             f"{result.params_type!r}; send weight differences (MonaiAlgo's send_weight_diff=True).")
        clipped, norm = self.client_dp.clip(result.params)
        self._clipped.append(clipped)
        entry["aggregated"].append(site)
        entry.setdefault("update_norms", {})[site] = norm
        return True

    def _get_aggregated_result(self) -> Any:
        entry = self._round_entry()
        if self.client_dp is None:
            return super()._get_aggregated_result()
        from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

        noisy = self.client_dp.aggregate(self._clipped, self._template)
        self.client_dp.record_round()
        from monai_dp.fl.accounts import save_account

        save_account(self.account_file, self.federation_id, "client_level", self.client_dp.accounting_state())
        entry["client_level"] = self.client_dp.report()
        self.info(f"Client-level DP: round {self.current_round} accounted, ε = {self.client_dp.get_epsilon():.4f} "
                  f"(δ = {self.client_dp.delta:.3g}).")
        params = {k: v.numpy() if not isinstance(self._template[k], torch.Tensor) else v for k, v in noisy.items()}
        return FLModel(params=params, params_type=ParamsType.DIFF, current_round=self.current_round,
                       meta={"nr_aggregated": len(self._clipped), "current_round": self.current_round})

    def update_model(self, model: Any, aggr_result: Any) -> Any:
        """FedAvg's update; a round in which no site trained (every budget spent before it) leaves the model as is."""
        if self.client_dp is None and not self._round_entry()["aggregated"]:
            self.info(f"Round {self.current_round}: no site trained; the global model is unchanged.")
            return model
        return super().update_model(model, aggr_result)

    # ------------------------------------------------------------------ stopping and the report
    def is_curr_model_better(self, curr_model: Any) -> bool:
        return super().is_curr_model_better(curr_model) if self._user_stop else True

    def should_stop(self, metrics: dict | None = None) -> bool:
        self.write_report()
        if self.client_dp is not None and not self.client_dp.allows_round():
            self.info(f"Client-level DP: one more round would exceed ε = {self.client_dp.target_epsilon}; the "
                      f"federation ends after round {self.current_round}.")
            self.client_level_stopped = self.current_round
            return True
        if not [c.name for c in self.engine.get_clients() if c.name not in self.stopped]:
            self.info(f"Every site has spent its privacy budget; the federation ends after round {self.current_round}.")
            return True
        return super().should_stop(metrics) if self._user_stop else False

    def run(self) -> None:
        self.started, completed = time.time(), False
        try:
            if self.client_level is not None:
                self.open_client_level()
            super().run()
            completed = True
        finally:
            self.write_report(finished=completed)

    def open_client_level(self) -> None:
        """Build the client-level mechanism, continue its account from the server's workspace root, and refuse to
        start when not even the first round fits its budget (nothing is released)."""
        from monai_dp.fl.accounts import (
            account_file,
            federation_id_of,
            load_account,
            require_round,
        )
        from monai_dp.fl.client_level import ClientLevelDP

        args = dict(self.client_level)
        self.federation_id = args.pop("federation_id", None) or federation_id_of(self.fl_ctx, "dp_fedavg")
        args.setdefault("num_sites", len(self.engine.get_clients()))
        args.setdefault("num_rounds", self.num_rounds)
        self.client_dp = ClientLevelDP(**args)
        self.account_file = account_file(self.engine.get_workspace().get_root_dir(), self.federation_id)
        state = load_account(self.account_file, self.federation_id, "client_level")
        if state is not None:
            self.client_dp.load_accounting_state(state)
        self.info(f"Client-level account of federation_id={self.federation_id!r} kept in {self.account_file}: "
                  f"{self.client_dp.rounds} earlier rounds, ε = {self.client_dp.get_epsilon():.4f}; a new "
                  "federation_id starts a new account.")
        require_round(self.client_dp, "client-level")

    def report(self, finished: bool = False) -> dict:
        sites = sorted({s for r in self.rounds for s in r["sites"]} | set(self.stopped))
        final = {}
        for site in sites:
            last = next((r["sites"][site] for r in reversed(self.rounds) if r["sites"].get(site)), None)
            stopped = self.stopped.get(site)
            final[site] = {"stopped_at_round": stopped, "privacy": last,
                           "left_early": stopped is not None and stopped < self.start_round + self.num_rounds - 1}
        return {"finished": finished, "num_rounds": self.num_rounds, "start_round": self.start_round,
                "rounds_run": len(self.rounds), "sites": final, "stopped": dict(self.stopped),
                "left_early": sorted(s for s, v in final.items() if v["left_early"]), "rounds": self.rounds,
                "client_level": None if self.client_dp is None else {
                    **self.client_dp.report(), "stopped_after_round": getattr(self, "client_level_stopped", None),
                    "federation_id": getattr(self, "federation_id", None),
                    "account_file": getattr(self, "account_file", None)},
                "wall_time_s": round(time.time() - getattr(self, "started", time.time()), 3)}

    def write_report(self, finished: bool = False) -> str:
        path = self.report_file
        if not os.path.isabs(path):
            path = os.path.join(self.get_run_dir(), path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.report(finished), f, indent=2)
        os.replace(tmp, path)
        return path
