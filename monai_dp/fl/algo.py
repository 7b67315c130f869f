"""DPMonaiAlgo: MONAI FL's ``MonaiAlgo`` for a site that trains with DP-SGD under one budget for the whole federation."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import FlStatistics

from monai_dp.utils.errors import DPConfigurationError
from monai_dp.utils.validation import error_message

__all__ = ["DPMonaiAlgo", "FLPrivacyKeys"]

logger = logging.getLogger(__name__)

SITE_LOCAL = "site-local"  # the dataset id sent when the site gave none (its ledger's id stays at the site)


class FLPrivacyKeys:
    """Keys of what a site reports with its update (``FLModel.meta``): plain types only."""

    PRIVACY = "dp_privacy"  # the site's privacy report after the round (see DPMonaiAlgo.privacy_report)
    EXHAUSTED = "dp_budget_exhausted"  # True: the site's budget allows no further step; it leaves the federation
    ROUND = "dp_round"  # the round the update belongs to


class DPMonaiAlgo(MonaiAlgo):
    """``monai.fl.client.MonaiAlgo`` for a bundle whose trainer is a ``DPSupervisedTrainer``.

    MonaiAlgo builds the bundle's trainer once and runs it again every round with ``max_epochs`` raised by
    ``local_epochs``. This class plans σ over the whole federation (``num_rounds * local_epochs`` epochs, the
    trainer's ``planned_epochs``) for the site's ``target_epsilon``, so one accountant and one budget
    (``trainer.privacy``) run across the rounds; saves the trainer's accounting after every round to
    ``state_file`` and restores it when the client process starts again; and charges every round to the
    site's own ``ledger`` under its own ``dataset_id``.

    What a site sends is covered by its guarantee: the weight updates are post-processing of DP-SGD. Training
    statistics (``best_validation_metric``, computed on the site's validation records, which are not protected by
    DP-SGD) are not sent, and ``evaluate`` and ``get_data_stats`` are refused unless allowed explicitly.

    Args:
        bundle_root: the bundle folder (a DP bundle, or any bundle whose trainer is ``DPSupervisedTrainer``).
        num_rounds: the number of federated rounds σ is planned over.
        local_epochs: epochs per round (MonaiAlgo's ``local_epochs``).
        target_epsilon: the site's budget ε (the bundle's ``target_epsilon`` otherwise).
        ledger: the site's privacy ledger file; the site's dataset is registered there on first use.
        dataset_id: the site's dataset id in its ledger (default: the fingerprint of its training records).
        output_dir: where this site's models, reports and ``state_file`` go (the bundle's ``ckpt_dir``).
        state_file: the trainer's accounting after each round (default ``<output_dir>/fl_privacy_state.pt``).
        overrides: further bundle config overrides (``train_kwargs`` of ``MonaiAlgo``).
        allow_validation_metrics: allow ``evaluate`` (metrics on the site's validation records, sent to the
            server in the clear: those records are not covered by DP-SGD).
        allow_nonprivate_statistics: allow ``get_data_stats`` (intensity histograms sent in the clear).
        kwargs: other arguments of ``MonaiAlgo`` (``config_train_filename``, ``send_weight_diff``, ...).
    """

    def __init__(self, bundle_root: str, num_rounds: int, local_epochs: int = 1, target_epsilon: float | None = None,
                 ledger: str | None = None, dataset_id: str | None = None, output_dir: str | None = None,
                 state_file: str | None = None, overrides: dict | None = None,
                 allow_validation_metrics: bool = False, allow_nonprivate_statistics: bool = False,
                 **kwargs: Any) -> None:
        for name, value in (("num_rounds", num_rounds), ("local_epochs", local_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or not value >= 1:
                raise ValueError(error_message(name, "an int >= 1", value))
        train_kwargs = dict(kwargs.pop("train_kwargs", None) or {})
        train_kwargs.update(overrides or {})
        train_kwargs["train#trainer#planned_epochs"] = num_rounds * local_epochs
        # the global model of every round is this site's accounted updates and other sites' outputs: nothing
        # of this site's data that its budget does not already count (see docs/federated.md)
        train_kwargs.setdefault("train#trainer#initial_weights", "public")
        if target_epsilon is not None:
            train_kwargs["target_epsilon"] = float(target_epsilon)
        if ledger is not None:
            train_kwargs["ledger"] = os.fspath(ledger)
            train_kwargs["train#trainer#register_dataset"] = True
        if dataset_id is not None:
            train_kwargs["dataset_id"] = str(dataset_id)
        if output_dir is not None:
            train_kwargs["ckpt_dir"] = os.fspath(output_dir)
            train_kwargs.setdefault("output_dir", os.path.join(os.fspath(output_dir), "eval"))
        if not allow_validation_metrics:
            kwargs.setdefault("config_evaluate_filename", None)  # no evaluator is built: evaluate() is refused
        else:  # the evaluator is built from the same site settings (data, network, outputs)
            kwargs["eval_kwargs"] = {**train_kwargs, **dict(kwargs.get("eval_kwargs") or {})}
        super().__init__(bundle_root=bundle_root, local_epochs=local_epochs, train_kwargs=train_kwargs, **kwargs)
        self.num_rounds = num_rounds
        self.output_dir = output_dir
        self.state_file = state_file or (os.path.join(output_dir, "fl_privacy_state.pt") if output_dir else None)
        self.allow_validation_metrics = bool(allow_validation_metrics)
        self.allow_nonprivate_statistics = bool(allow_nonprivate_statistics)
        self.rounds_done = 0
        # sent to the server in the clear only when the site chose it: the default id is a fingerprint of the
        # training records, which anyone holding a candidate record list could test
        self.sent_dataset_id = SITE_LOCAL if dataset_id is None else str(dataset_id)

    # ------------------------------------------------------------------ lifecycle
    def initialize(self, extra: dict | None = None) -> None:
        from monai.fl.utils.constants import ExtraItems

        self._check_trainer(self._configured_trainer_class(os.path.join((extra or {}).get(ExtraItems.APP_ROOT, ""),
                                                                        self.bundle_root)))
        super().initialize(extra)
        self._check_trainer(type(self.trainer))
        self._restore()
        self.logger.info("%s: %s", self.client_name, self.trainer.privacy.describe())

    def _configured_trainer_class(self, bundle_root: str) -> type | None:
        """The class the bundle config builds as ``train#trainer`` (``None`` when it cannot be told beforehand)."""
        import pydoc

        from monai.bundle import ConfigParser
        from monai.bundle.config_item import ComponentLocator

        if self.train_workflow is not None or self.config_train_filename is None:
            return None
        parser = ConfigParser()
        files = self.config_train_filename
        parser.read_config([os.path.join(bundle_root, f) for f in ([files] if isinstance(files, str) else files)])
        parser.update(self.train_kwargs)
        target = parser.get("train#trainer#_target_") if "train#trainer" in parser else None
        if not isinstance(target, str):
            return None
        module = ComponentLocator().get_component_module_name(target)
        located = pydoc.locate(f"{module}.{target}" if isinstance(module, str) else target)
        return located if isinstance(located, type) else None

    @staticmethod
    def _check_trainer(trainer_class: type | None) -> None:
        from monai_dp.engines import DPSupervisedTrainer

        if trainer_class is not None and not issubclass(trainer_class, DPSupervisedTrainer):
            raise DPConfigurationError(error_message(
                "train#trainer", "a monai_dp.engines.DPSupervisedTrainer", trainer_class.__name__,
                "A plain trainer's updates carry no privacy guarantee; use a DP bundle or configs/dp_trainer.json."))

    def _restore(self) -> None:
        """A restarted client continues the accounting saved after its last round (never starts from zero)."""
        if not self.state_file or not os.path.isfile(self.state_file):
            return
        state = torch.load(self.state_file, map_location="cpu", weights_only=True)
        self.trainer.load_state_dict(state["trainer"])
        self.rounds_done = int(state.get("rounds_done", 0))
        self.logger.info("%s: restored the accounting of %d steps over %d rounds from %s (ε = %.4g).",
                         self.client_name, self.trainer.dp_steps, self.rounds_done, self.state_file,
                         self.trainer.get_epsilon())

    def _save(self) -> None:
        if not self.state_file:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.state_file)), exist_ok=True)
        tmp = f"{self.state_file}.tmp"
        torch.save({"trainer": self.trainer.state_dict(), "rounds_done": self.rounds_done}, tmp)
        os.replace(tmp, self.state_file)

    # ------------------------------------------------------------------ rounds
    def train(self, data: Any, extra: dict | None = None) -> None:
        """One round: MonaiAlgo's (load the global weights, ``max_epochs += local_epochs``, run), then save the
        accounting. A site whose budget is spent runs no step (the trainer's gate stops it before the first)."""
        try:
            super().train(data, extra)
        finally:
            self.rounds_done += 1
            self._save()

    @property
    def budget_exhausted(self) -> bool:
        """Whether the site's budget refuses the next step (its plan is used up, or its ledger is spent)."""
        return bool(getattr(self.trainer.state, "dp_budget_exhausted", False)) or not self.trainer.privacy.allows_step()

    def privacy_report(self) -> dict:
        """What the site may tell the server of its privacy: ε so far, δ, σ, q, steps, unit, ledger, and the dataset id
        only when the site configuration gave one (otherwise ``"site-local"``: never the records' fingerprint)."""
        priv = self.trainer.privacy
        ledger = priv.ledger_info
        return {
            "epsilon": float(priv.get_epsilon()), "delta": float(priv.delta),
            "target_epsilon": None if priv.target_epsilon is None else float(priv.target_epsilon),
            "noise_multiplier": float(priv.noise_multiplier), "sample_rate": float(priv.sample_rate),
            "max_grad_norm": float(priv.max_grad_norm), "steps": int(priv.steps), "unit": str(priv.unit),
            "accountant": str(priv.accountant.name), "dataset_id": self.sent_dataset_id,
            "ledger": None if not ledger else str(ledger.get("path", "")),
            "history": [[float(s), float(q), int(n)] for s, q, n in priv.accountant.history],
            "rounds_done": self.rounds_done, "budget_exhausted": self.budget_exhausted,
        }

    def get_weights(self, extra: dict | None = None) -> Any:
        """MonaiAlgo's weights (or difference); the statistics sent are the executed steps only, unless
        ``allow_validation_metrics`` (the trainer's stats hold its best validation metric)."""
        weights = super().get_weights(extra)
        if not self.allow_validation_metrics and isinstance(weights.statistics, dict):
            kept = FlStatistics.NUM_EXECUTED_ITERATIONS
            weights.statistics = {k: v for k, v in weights.statistics.items() if k == kept}
        return weights

    # ------------------------------------------------------------------ what is refused
    def evaluate(self, data: Any, extra: dict | None = None) -> Any:
        if not self.allow_validation_metrics:
            raise DPConfigurationError(error_message(
                "allow_validation_metrics", "True to send validation metrics", False,
                "Metrics on the site's validation records are sent to the server in the clear and are not covered "
                "by DP-SGD (which protects the training records only); pass allow_validation_metrics=True to send "
                "them (the training records stay covered: the metrics are post-processing of the DP model)."))
        self._check_validation_disjoint()
        return super().evaluate(data, extra)

    def _check_validation_disjoint(self) -> None:
        """Metrics computed on training records would release them outside the accounting: refused."""
        def images(loader: Any) -> set:
            data = getattr(getattr(loader, "dataset", None), "data", None) or []
            return {str(d.get("image")) for d in data if isinstance(d, dict) and "image" in d}

        shared = images(self.trainer.data_loader) & images(getattr(self.evaluator, "data_loader", None))
        if shared:
            raise DPConfigurationError(error_message(
                "evaluator data", "records outside the training set", f"{len(shared)} training records",
                "Evaluate on a held-out split (the bundle's validation or test records)."))

    def get_data_stats(self, extra: dict | None = None) -> Any:
        if not self.allow_nonprivate_statistics:
            raise DPConfigurationError(error_message(
                "allow_nonprivate_statistics", "True to send data statistics", False,
                "get_data_stats sends intensity histograms of the site's images without DP noise, outside the "
                "site's budget; pass allow_nonprivate_statistics=True to send them in the clear (not covered by "
                "the guarantee)."))
        logger.warning("%s: data statistics are sent without DP (allow_nonprivate_statistics=True).", self.client_name)
        return super().get_data_stats(extra)
