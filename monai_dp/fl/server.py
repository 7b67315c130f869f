"""DPFedAvg: NVFlare's FedAvg controller for sites that train with DP-SGD, each under its own budget.

A site whose budget is spent says so with its last update (``FLModel.meta["dp_budget_exhausted"]``); the server
averages that update, leaves the site out of later rounds and goes on with the others; the federation ends early
when no site is left. After every round the federation report (JSON) records each site's privacy report and
which site stopped at which round.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from nvflare.app_common.workflows.fedavg import FedAvg

from monai_dp.fl.algo import FLPrivacyKeys

__all__ = ["DPFedAvg"]


class DPFedAvg(FedAvg):
    """``nvflare.app_common.workflows.fedavg.FedAvg`` that follows each site's privacy budget.

    Args:
        report_file: the federation report; a relative path is under the server's run folder.
        args, kwargs: those of ``FedAvg``.
    """

    def __init__(self, *args: Any, report_file: str = "federation_report.json", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report_file = report_file
        self.stopped: dict[str, int] = {}  # site -> round of its last update (its budget was spent)
        self.rounds: list[dict] = []  # per round: {"round", "sites": {site: privacy report}, "aggregated": [...]}
        self._user_stop = self.stop_condition is not None
        if not self._user_stop:  # FedAvg asks should_stop() only with a stop condition: one that never fires
            self.stop_condition = ("", 0, lambda value, target: False)

    # ------------------------------------------------------------------ who trains
    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        clients = [c for c in super().sample_clients(None) if c not in self.stopped]
        if num_clients and num_clients < len(clients):
            clients = clients[:num_clients]
        self.info(f"Sites still within their privacy budget: {clients}; stopped: {self.stopped}")
        return clients

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
        accepted = super()._aggregate_one_result(result)
        if accepted:
            entry["aggregated"].append(site)
        return accepted

    def _get_aggregated_result(self) -> Any:
        self._round_entry()
        return super()._get_aggregated_result()

    def update_model(self, model: Any, aggr_result: Any) -> Any:
        """FedAvg's update; a round in which no site trained (every budget spent before it) leaves the model as is."""
        if not self._round_entry()["aggregated"]:
            self.info(f"Round {self.current_round}: no site trained; the global model is unchanged.")
            return model
        return super().update_model(model, aggr_result)

    # ------------------------------------------------------------------ stopping and the report
    def is_curr_model_better(self, curr_model: Any) -> bool:
        return super().is_curr_model_better(curr_model) if self._user_stop else True

    def should_stop(self, metrics: dict | None = None) -> bool:
        self.write_report()
        if not [c.name for c in self.engine.get_clients() if c.name not in self.stopped]:
            self.info(f"Every site has spent its privacy budget; the federation ends after round {self.current_round}.")
            return True
        return super().should_stop(metrics) if self._user_stop else False

    def run(self) -> None:
        self.started, completed = time.time(), False
        try:
            super().run()
            completed = True
        finally:
            self.write_report(finished=completed)

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
