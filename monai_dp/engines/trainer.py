"""DPSupervisedTrainer: MONAI's SupervisedTrainer with record- or patient-level (ε, δ)-DP-SGD."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import (
    IterationEvents,
    default_metric_cmp_fn,
    default_prepare_batch,
)
from monai.engines.workflow import Workflow
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DataLoader

from monai_dp.data import (
    get_row_groups,
    is_empty_batch,
)
from monai_dp.data.units import resolve_patient_ids
from monai_dp.engines.builder import DPOptions, build_dp_setup, rebuild_training_loader
from monai_dp.engines.checks import check_finite
from monai_dp.engines.digest import weights_digest
from monai_dp.engines.empty_step import EmptyStepOutput
from monai_dp.engines.history import (
    INITIAL_WEIGHTS,
    InitialWeightsCheck,
    register_network,
)
from monai_dp.engines.optimizer import (
    PrivateNoiseDistributedDPOptimizer,
    PrivateNoiseDPOptimizer,
)
from monai_dp.engines.run_log import RunLog
from monai_dp.engines.setup import (
    item_chunks,
)
from monai_dp.losses import check_targets
from monai_dp.privacy.budget import PrivacyBudget
from monai_dp.utils.errors import (
    DPConfigurationError,
    PrivacyBudgetExhaustedError,
)
from monai_dp.utils.keys import DPKeys
from monai_dp.utils.randomness import os_seed
from monai_dp.utils.validation import check_choice, error_message

__all__ = ["DPSupervisedTrainer"]

logger = logging.getLogger(__name__)



class _StepGate:
    """Puts the trainer's own budget gate first on ``ITERATION_STARTED`` (before any user handler)."""

    def attach(self, engine: Any) -> None:
        if not engine.has_event_handler(engine._budget_gate, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, engine._budget_gate)


class DPSupervisedTrainer(SupervisedTrainer):
    """``monai.engines.SupervisedTrainer`` with differentially private SGD, at record or patient level.

    Takes every argument of ``SupervisedTrainer`` and these:

    Args:
        target_epsilon: the privacy budget ε. Without ``noise_multiplier``, σ is calibrated so that ``max_epochs``
            epochs spend at most ε; with it, ε is a cap and training stops before the step that would exceed it.
        target_delta: δ; must be below 1/N. Default ``min(1e-5, 1/(10 N))``.
        noise_multiplier: σ, noise standard deviation relative to ``max_grad_norm``.
        max_grad_norm: clip norm C of each sampled item's gradient (default 1.0).
        accountant: ``"prv"`` (default, tight), ``"pld"`` (tight, Google's dp-accounting), ``"rdp"`` (about 9 %
            looser in ε) or ``"gdp"`` (an approximation, not a bound: needs ``allow_approximate_accounting``).
        allow_approximate_accounting: allow ``accountant="gdp"``; logged as a WARNING.
        max_physical_batch_size: split a logical (Poisson) batch into physical batches of at most this many items
            (virtual steps); the accounting follows the logical steps. ``accumulation_steps=k`` maps onto this:
            the logical batch is ``k * batch_size`` items and the physical batch ``batch_size``.
        poisson_sampling: rebuild ``train_data_loader`` with Poisson sampling at rate ``batch_size / N`` (default).
        allow_non_poisson_sampling: needed with ``poisson_sampling=False``; the accountant then assumes Poisson
            sampling that did not happen, which is logged as a WARNING and recorded in the checkpoint.
        make_compatible: convert the network with :func:`monai_dp.networks.make_private_compatible` (default).
        noise_seed: seed of the noise generator, for reproducible tests only; ``None`` draws fresh randomness.
        secure_mode: Opacus' secure noise generation (slower; protects against floating-point attacks).
        sampling_seed: seed of the Poisson sampler's generator (``None``: fresh).
        privacy_unit: ``"record"`` (default) or ``"patient"``. At patient level each patient enters a step with
            probability q = batch_size / number of patients (the loader's ``batch_size`` then counts patients)
            with all of their records; the records' gradients are summed into one per-patient gradient, which
            is clipped; the accountant counts patients and δ defaults to ``min(1e-5, 1/(10 P))``.
        patient_key: the record key holding the patient id (read from ``train_data_loader.dataset.data``).
        patient_ids: one patient id per record, instead of reading ``patient_key``.
        max_records_per_patient: at patient level, use at most this many of a patient's records per step, drawn
            at random each step (bounds memory; the guarantee is unchanged since the patient is clipped whole).
        ledger: a privacy ledger (path of its SQLite file, or a ``PrivacyLedger``): the run is charged to the
            dataset's budget there, refused before its first step if the budget is spent, shortened if only part
            of it is left (see :class:`~monai_dp.handlers.PrivacyLedgerHandler`).
        dataset_id: the dataset's id in the ledger and the report; default: a fingerprint of the training
            records' identifiers (patient id, image, label).
        grad_sample_mode: how the clipped sum of per-item gradients is computed. ``"ghost"``: mixed ghost
            clipping (:class:`~monai_dp.networks.GhostClipping`: per-item norms without per-item gradients, then
            the clipped sum by book-keeping); ``"per_sample"``: materialise every item's gradient
            (:class:`~monai_dp.networks.PerSampleGradients`, any layer autograd supports); ``"auto"`` (default):
            the faster of the two, timed on the first physical batch (where ghost clipping supports every
            layer; the two clipped sums are compared there too, and a mismatch raises). Both give the same
            clipped sum (tested to float64 precision), so the guarantee does not depend on the choice.
        planned_epochs / planned_steps: the privacy plan: σ is calibrated from ``target_epsilon`` over this many
            epochs (or logical steps) instead of ``max_epochs``, so a job that runs the trainer again with a
            larger ``max_epochs`` (MONAI FL's ``MonaiAlgo``: ``state.max_epochs = epoch + local_epochs``, then
            ``run()``) keeps one σ and one budget across its runs.
        privacy_budget: the :class:`~monai_dp.privacy.budget.PrivacyBudget` of an earlier trainer
            (``trainer.privacy``) to continue: its plan, σ, accounting and gates carry on (the next federated
            round, the next retrain); the training set, batch size and unit must be the same, and the DP
            arguments above must be left unset.
        privacy_history: where the privacy history of weights loaded after construction is looked up: a model
            file saved with ``{"model": network, "privacy": PrivacyHistory(network)}``, a trainer checkpoint, a
            folder of them, or a list. Before its first step the trainer compares the network's weights with those
            it was built with; changed weights (e.g. MONAI Label's ``CheckpointLoader`` of ``model.pt``) must
            have their history found there (matched by the weights' digest), which is then composed before this
            run's steps, or training is refused (see :mod:`monai_dp.engines.history`).
        initial_weights: ``"accounted"`` (default: as above) or ``"public"``: weights loaded after construction
            are declared to carry no private training (a public pretrained model), so no history is looked up
            (logged as a WARNING, recorded in the report). Weights loaded before construction are the user's
            starting point either way.
        register_dataset: with ``ledger``, create the ledger file if it is missing and, on first use, register
            the dataset with the budget (``target_epsilon``, δ, unit); later runs on the same data compose with
            the earlier ones or are refused when it is spent (bundles do this by default).
        patient_id_pattern: a regular expression searched in each record's image path for records without
            ``patient_key``: its group ``patient`` (or first group, or whole match) is the patient id.
            Without it, records without ids whose image is DICOM get the header's PatientID.
        progress_interval: log a progress line (epoch, iteration, DP steps, seconds per iteration) every this many
            iterations of an epoch; ``"auto"`` (default): once at least 30 s have passed since the epoch started or
            the last line (long epochs only); ``None``: never (see :class:`~monai_dp.engines.run_log.RunLog`).

    The privacy budget (``trainer.privacy``) decides every step: the trainer asks it on ``ITERATION_STARTED``
    and stops gracefully (``state.dp_budget_exhausted``) before the step that would exceed it.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        inferer: Any = None,
        postprocessing: Any = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        accumulation_steps: int = 1,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float | None = None,
        accountant: str | None = None,
        max_physical_batch_size: int | None = None,
        poisson_sampling: bool = True,
        allow_non_poisson_sampling: bool = False,
        make_compatible: bool = True,
        noise_seed: int | None = None,
        secure_mode: bool = False,
        sampling_seed: int | None = None,
        privacy_unit: str = "record",
        patient_key: str = "patient_id",
        patient_ids: Sequence | None = None,
        max_records_per_patient: int | None = None,
        ledger: Any = None,
        dataset_id: str | None = None,
        allow_approximate_accounting: bool = False,
        grad_sample_mode: str = "auto",
        planned_epochs: int | None = None,
        planned_steps: int | None = None,
        privacy_budget: PrivacyBudget | None = None,
        privacy_history: Any = None,
        initial_weights: str = "accounted",
        register_dataset: bool = False,
        patient_id_pattern: str | None = None,
        progress_interval: int | str | None = "auto",
    ) -> None:
        run_log = RunLog(progress_interval)
        patient_ids = resolve_patient_ids(train_data_loader, patient_key, patient_ids, patient_id_pattern)
        args = locals()
        setup = build_dp_setup(
            device=device, max_epochs=max_epochs, epoch_length=epoch_length, loader=train_data_loader, network=network,
            optimizer=optimizer, loss_function=loss_function, inferer=inferer, amp=amp, amp_kwargs=amp_kwargs,
            accumulation_steps=accumulation_steps, iteration_update=iteration_update, compile=compile,
            options=DPOptions(**{f.name: args[f.name] for f in fields(DPOptions)}))
        self.dp_setup, self.privacy, self._dp_loader = setup, setup.budget, setup.loader
        self._amp_dtype, self.physical_batch_size, self.dp_network_params = (
            setup.amp_dtype, setup.physical_batch_size, setup.params)
        self.clipper, self.grad_sample_mode, self._pred_layout = setup.clipper, setup.clipper.mode, None
        check_choice("initial_weights", initial_weights, INITIAL_WEIGHTS)
        self.register_dataset = bool(register_dataset)
        super().__init__(
            device=device, max_epochs=max_epochs, train_data_loader=setup.loader, network=setup.network,
            optimizer=setup.optimizer, loss_function=loss_function, epoch_length=epoch_length,
            non_blocking=non_blocking, prepare_batch=prepare_batch, iteration_update=None, inferer=inferer,
            postprocessing=postprocessing, key_train_metric=key_train_metric, additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn, train_handlers=self._own_handlers(train_handlers, ledger) + list(
                train_handlers or []), amp=amp, event_names=event_names, event_to_attr=event_to_attr,
            decollate=decollate, optim_set_to_none=optim_set_to_none, to_kwargs=to_kwargs, amp_kwargs=amp_kwargs,
            compile=False, compile_kwargs=None, accumulation_steps=1,
        )
        self.clipper.inferer = self.inferer
        self.privacy.bind(mechanism=self._current_mechanism, digest=lambda: weights_digest(self.network, self.optimizer),
                          model_digest=lambda: weights_digest(self.network))
        for net in {id(network): network, id(self.network): self.network}.values():
            register_network(net, self)
        self.initial_weights_check = InitialWeightsCheck(self.network, initial_weights, privacy_history)
        if setup.optimizer.secure_mode:
            self.add_event_handler(Events.EPOCH_STARTED, self._reseed_sampler)
        run_log.attach(self)  # after every handler given: it reports what a CheckpointLoader restored
        self.logger.info(self.privacy.describe())

    def _own_handlers(self, train_handlers: Sequence | None, ledger: Any) -> list:
        """The step gate first, then the handlers the user did not give: publishing ε, the ledger."""
        from monai_dp.handlers import PrivacyLedgerHandler, PrivacyMetricsHandler

        handlers = list(train_handlers or [])
        own: list = [_StepGate()]
        if ledger is not None and not any(isinstance(h, PrivacyLedgerHandler) for h in handlers):
            own.append(PrivacyLedgerHandler(ledger, self.privacy.dataset_id, register=self.register_dataset))
        if not any(isinstance(h, PrivacyMetricsHandler) for h in handlers):
            own.append(PrivacyMetricsHandler())
        return own

    def _budget_gate(self, engine: Any) -> None:
        """``ITERATION_STARTED``: ask the budget; when it refuses the step, log why and stop gracefully."""
        self.initial_weights_check(self.network, self.optimizer, self.privacy)  # first step: loaded weights' history
        verdict = self.privacy.next_step_verdict()
        if verdict.allowed:
            return
        setattr(engine.state, DPKeys.BUDGET_EXHAUSTED, True)
        setattr(engine.state, DPKeys.STOPPED_BY, verdict.gate)
        self.logger.info("%s", verdict.message)
        engine.state.iteration -= 1  # Ignite counted this iteration before ITERATION_STARTED; it does not run
        engine.terminate()

    def _reseed_sampler(self, _engine: Any = None) -> None:
        """secure_mode: every epoch's sampling from a generator freshly seeded by the operating system."""
        generator = getattr(getattr(self._dp_loader, "batch_sampler", None), "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(os_seed())

    # ------------------------------------------------------------------ loaders
    def _dp_loader_for(self, data: Any) -> DataLoader:
        """``data`` as the trainer may iterate it: its own loader, or ``data`` rebuilt with Poisson sampling."""
        if data is getattr(self, "_dp_loader", None):
            return data
        return rebuild_training_loader(self.dp_setup, self.privacy, data)

    @property
    def data_loader(self) -> Any:
        return self._dp_loader

    @data_loader.setter
    def data_loader(self, data: Any) -> None:
        self._dp_loader = self._dp_loader_for(data)

    def set_data(self, data: Any) -> None:
        """Ignite's ``set_data``, with ``data`` rebuilt with Poisson sampling over the same training set."""
        self.data_loader = data
        super().set_data(self._dp_loader)

    def _current_mechanism(self) -> tuple[float, float]:
        """(σ, q) in force: the DP optimizer's noise multiplier and the sampler's rate."""
        if not isinstance(self.optimizer, (PrivateNoiseDPOptimizer, PrivateNoiseDistributedDPOptimizer)):
            raise DPConfigurationError(error_message(
                "trainer.optimizer", "the DP optimizer the trainer built", type(self.optimizer).__name__,
                "An optimizer swapped in after construction neither clips nor adds noise; build a new trainer."))
        return self.optimizer.noise_multiplier, self._loader_sample_rate()

    def _loader_sample_rate(self) -> float:
        """q of the loader being iterated (its Poisson sampler's rate; the planned q for a non-Poisson loader)."""
        sampler = getattr(self._dp_loader, "batch_sampler", None)
        rate = getattr(sampler, "sample_rate", None)
        return self.privacy.sample_rate if rate is None else rate

    # ------------------------------------------------------------------ public API
    def run(self) -> None:  # type: ignore[override]
        """Run training. Unlike ``SupervisedTrainer.run`` no GradScaler is created: DP never scales gradients."""
        self.scaler = None
        Workflow.run(self)

    def _handle_exception(self, e: BaseException) -> None:
        """Close the ledger run as ``failed`` (what it spent stays counted) before Ignite handles the exception."""
        try:
            self.privacy.finish("failed")
        except Exception as err:  # never hide the original error
            self.logger.error("Could not close the privacy ledger run: %s", err)
        super()._handle_exception(e)

    def get_epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: ``target_delta``)."""
        return self.privacy.get_epsilon(delta)

    @property
    def dp_steps(self) -> int:
        """Number of noisy (logical) optimizer steps taken, including resumed ones."""
        return self.privacy.steps

    def state_dict(self) -> dict:
        """Ignite's trainer state plus the privacy accounting state (plain types only)."""
        sd = super().state_dict()
        sd["privacy"] = self.privacy.state_dict()
        return sd

    def load_state_dict(self, state_dict: Any) -> None:
        sd = dict(state_dict)
        priv = sd.pop("privacy", None)
        if priv is None and int(sd.get("iteration", 0) or 0) > 0:
            raise ValueError(
                error_message("state_dict", "a DP trainer checkpoint with a 'privacy' entry", sorted(sd),
                              "Resuming without the accounting state would reset ε; save the DPSupervisedTrainer.")
            )
        if priv is not None:
            history = priv.get("accountant", {}).get("history", []) if isinstance(priv, dict) else []
            try:
                steps = sum(int(entry[2]) for entry in history)
            except (TypeError, ValueError, IndexError):
                steps = -1  # the accountant's own check below names the bad entry
            iteration = int(sd.get("iteration", 0) or 0)
            if 0 <= steps < iteration:
                raise ValueError(error_message(
                    "state_dict['privacy']", f"an accounting of at least state_dict['iteration'] = {iteration} steps",
                    f"{steps} steps", "Every iteration of a DP trainer is an accounted step; this checkpoint's "
                    "accounting does not belong to its weights. Resume from a checkpoint saved by the trainer."))
            self.privacy.load_state_dict(priv)
        super().load_state_dict(sd)

    # ------------------------------------------------------------------ the iteration
    def _iteration(self, engine: DPSupervisedTrainer, batchdata: Any) -> dict:
        """One logical DP step. Every iteration that gets past the checks below is accounted as a step, also when
        it fails (the sampling happened; a failure can reveal something): the accounting is never below the
        number of iterations (checked when a checkpoint is loaded)."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if engine.state.dataloader not in (engine._dp_loader, None):  # None: a direct call, outside run()
            engine.state.iteration -= 1  # this iteration does not happen
            raise DPConfigurationError(error_message(
                "engine.state.dataloader", "the trainer's own Poisson-sampled loader",
                type(engine.state.dataloader).__name__,
                "Set a new loader with trainer.set_data(loader) or trainer.data_loader = loader, which rebuild it "
                "with Poisson sampling."))
        verdict = engine.privacy.next_step_verdict()
        if not verdict.allowed:  # a backstop: the step gate on ITERATION_STARTED stops training before this
            engine.state.iteration -= 1
            raise PrivacyBudgetExhaustedError(verdict.message)
        steps = engine.privacy.steps
        try:
            return engine._dp_iteration(engine, batchdata)
        except BaseException:
            if engine.privacy.steps == steps:
                engine._account_failed_step()
            raise

    def _account_failed_step(self) -> None:
        """Account a step that failed before its update (nothing applied): the sampling already happened."""
        self._reset_accumulators()
        try:
            if self.privacy.allows_step():
                self.privacy.before_step()
                self.privacy.record_step()
        except Exception as err:  # never hide the original error
            self.logger.error("Could not account the failed step: %s", err)

    def _dp_iteration(self, engine: DPSupervisedTrainer, batchdata: Any) -> dict:
        engine.network.train()
        engine._reset_accumulators()
        if is_empty_batch(batchdata):
            return engine._noise_only_step()
        inputs, targets, groups = engine._unpack(batchdata)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        num_items = int(groups.max().item()) + 1
        chunks = item_chunks(groups, num_items, engine.physical_batch_size or num_items)
        losses, preds = [], []
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        y = targets.as_tensor() if hasattr(targets, "as_tensor") else targets
        engine._check_targets(x, y)
        losses, preds = engine._clipped_sums(x, y, groups, chunks)
        engine.state.output[Keys.PRED] = torch.cat(preds)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = torch.cat(losses).mean()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine._noisy_step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _clipped_sums(self, x, y, groups, chunks) -> tuple[list, list]:
        """The clipped sum of every physical batch (one contract for both engines), added into ``p.summed_grad``.

        The DP optimizer then sees no per-item gradients (its clip-and-accumulate adds nothing) and adds the noise
        to this sum.
        """
        losses, preds, total = [], [], None
        if not self.clipper.decided:
            self.logger.info(
                "grad_sample_mode='auto': timing ghost clipping against per-sample gradients on the first batch "
                "to keep the faster, and checking that they agree; this first step takes about one step of each "
                "plus one of the faster (grad_sample_mode='ghost' or 'per_sample' skips this).")
        for first_item, last_item, r0, r1 in chunks:
            rows = groups[r0:r1] - first_item
            out = self.clipper.clipped_sum(x[r0:r1], y[r0:r1], rows, last_item - first_item,
                                           self.optimizer.max_grad_norm, self._amp_dtype)
            check_finite(out.losses, out.norms, rows, r0, self.state)
            total = out.summed if total is None else {n: total[n] + g for n, g in out.summed.items()}
            losses.append(out.losses)
            preds.append(out.preds)
        for name, p in self.dp_network_params:
            p.summed_grad = total[name].to(p.dtype)
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return losses, preds

    @property
    def grad_sampler(self) -> Any:
        """The per-sample gradient engine (:class:`~monai_dp.networks.PerSampleGradients`) of the clipper."""
        return self.clipper.per_sample

    @property
    def ghost(self) -> Any:
        """The ghost clipping engine of the clipper, ``None`` where per-sample gradients are used."""
        return self.clipper.ghost

    def _check_targets(self, x: torch.Tensor, y: Any) -> None:
        """Class labels out of range get a clear error before any loss runs (on CUDA an out-of-range index is a
        device-side assert that breaks the context). The prediction's layout comes from one row, once."""
        if self._pred_layout is None:
            with torch.no_grad():
                probe = self.inferer(x[:1], self.network) if self.inferer is not None else self.network(x[:1])
            probe = probe[0] if isinstance(probe, (list, tuple)) else probe
            self._pred_layout = torch.empty(tuple(probe.shape[:2]) + (1,) * max(probe.ndim - 2, 0))
        check_targets(self._pred_layout, y, self.loss_function)

    def _unpack(self, batchdata: Any) -> tuple[Any, Any, torch.Tensor]:
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        if len(batch) == 2:
            inputs, targets = batch
        else:
            inputs, targets, args, kwargs = batch
            if args or kwargs:
                raise DPConfigurationError(error_message("prepare_batch output", "(inputs, targets) with DP training",
                                                         "extra network arguments"))
        rows = inputs.shape[0]
        groups = get_row_groups(batchdata)
        groups = torch.arange(rows) if groups is None else torch.as_tensor(groups)
        if groups.numel() != rows:
            raise RuntimeError(
                error_message("prepare_batch output", f"{groups.numel()} rows, one per collated row", rows,
                              "A prepare_batch that adds or drops rows breaks per-item clipping.")
            )
        return inputs, targets, groups.to(device=inputs.device, dtype=torch.long)

    def _reset_accumulators(self) -> None:
        """Start a logical step from nothing: no clipped sum may survive from an interrupted step."""
        self.optimizer._is_last_step_skipped = False
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        for _, p in self.dp_network_params:
            p.summed_grad = None
            p.grad_sample = None

    def _noisy_step(self) -> None:
        verdict = self.privacy.next_step_verdict()  # σ or q may have changed during the iteration
        if not verdict.allowed:
            raise PrivacyBudgetExhaustedError(verdict.message)
        self.privacy.before_step()
        self.optimizer.signal_skip_step(do_skip=False)
        self.optimizer.step()
        self.privacy.record_step()
        if self.optimizer._is_last_step_skipped:  # pragma: no cover - guards an Opacus behaviour change
            raise RuntimeError("DPOptimizer skipped the noisy step; the accounting would not match the updates.")

    def _noise_only_step(self) -> EmptyStepOutput:
        """An empty Poisson batch: the analysis assumes the noisy step still happens, so take it. The output holds
        no item and no loss (:class:`~monai_dp.engines.empty_step.EmptyStepOutput`): metrics count nothing for the
        step, MONAI's loggers log nothing, and no ``IterationEvents`` fire (no forward pass, nothing to decollate
        or post-process)."""
        for _, p in self.dp_network_params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.state.output = EmptyStepOutput()
        self._noisy_step()
        self.logger.debug("Empty Poisson batch: took a noise-only step.")
        return self.state.output
