"""Everything a DP trainer is made of, built and checked in one place.

:func:`build_dp_setup` turns the trainer's arguments into a frozen :class:`DPSetup`: the network made DP-compatible,
the Poisson-sampled loader (and the :class:`LoaderPlan` that rebuilds any later loader the same way), the
:class:`~monai_dp.privacy.budget.PrivacyBudget` (calibrated over the *plan*, or handed in from an earlier run), the
DP optimizer with its private noise source, and the clipper (:func:`~monai_dp.networks.make_clipper`). The trainer only wires them into MONAI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    SequentialSampler,
)

from monai_dp.data import dataset_length, loader_batch_size, make_poisson_loader
from monai_dp.data.poisson import make_distributed_poisson_loader, rebuild_loader
from monai_dp.data.units import PRIVACY_UNITS, sampling_units
from monai_dp.engines.config import DPSettings, check_amp, resolve_delta
from monai_dp.engines.optimizer import (
    PrivateNoiseDistributedDPOptimizer,
    PrivateNoiseDPOptimizer,
)
from monai_dp.engines.setup import broadcast_parameters, records_fingerprint
from monai_dp.losses import check_per_sample_loss, make_per_sample_loss
from monai_dp.networks import (
    AutoClipper,
    find_incompatible_modules,
    make_clipper,
    make_private_compatible,
)
from monai_dp.networks.projection import statistics_releases
from monai_dp.privacy.budget import PrivacyBudget, PrivacyPlan
from monai_dp.utils.distributed import rank_world
from monai_dp.utils.errors import DPConfigurationError, DPIncompatibleModuleError
from monai_dp.utils.randomness import (
    REPRODUCIBLE_NOISE_WARNING,
    SecureGaussian,
    private_generator,
)
from monai_dp.utils.validation import check_choice, check_positive_int, error_message

__all__ = ["DPOptions", "DPSetup", "LoaderPlan", "build_dp_setup", "rebuild_training_loader"]

logger = logging.getLogger("monai_dp.engines.trainer")

@dataclass(frozen=True)
class DPOptions:
    """The DP arguments of :class:`~monai_dp.engines.DPSupervisedTrainer`, as given (documented there)."""

    target_epsilon: float | None = None
    target_delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    max_physical_batch_size: int | None = None
    poisson_sampling: bool = True
    allow_non_poisson_sampling: bool = False
    make_compatible: bool = True
    noise_seed: int | None = None
    secure_mode: bool = False
    sampling_seed: int | None = None
    privacy_unit: str = "record"
    patient_key: str = "patient_id"
    patient_ids: Sequence | None = None
    max_records_per_patient: int | None = None
    ledger: Any = None
    dataset_id: str | None = None
    allow_approximate_accounting: bool = False
    grad_sample_mode: str = "auto"
    planned_epochs: int | None = None
    planned_steps: int | None = None
    privacy_budget: PrivacyBudget | None = None


@dataclass(frozen=True)
class LoaderPlan:
    """How a training loader becomes the loader the trainer iterates (Poisson sampling at the accounted q)."""

    poisson: bool
    allow_non_poisson: bool
    sampling_seed: int | None
    rank: int
    world: int
    unit: str
    patient_key: str
    patient_ids: Sequence | None
    max_records: int | None
    generator: torch.Generator | None  # the single-process sampler's private generator

    def units(self, loader: Any) -> tuple[Any, dict | None]:
        """The dataset of sampled units (``None``: records) and the records-per-patient summary."""
        return sampling_units(loader, self.unit, self.patient_key, self.patient_ids, self.max_records)

    def build(self, loader: Any, sample_rate: float, units: Any) -> tuple[DataLoader, str]:
        """``loader`` rebuilt with Poisson sampling (or refused), and the name of the sampling."""
        if self.world > 1:
            if not self.poisson:
                raise DPConfigurationError(error_message("poisson_sampling", "True with several processes",
                                                         self.poisson))
            loader = _without_distributed_sampler(loader, self.world)
            return make_distributed_poisson_loader(loader, sample_rate, self.rank, self.world, self.sampling_seed,
                                                   dataset=units), "poisson"
        if self.poisson:
            return make_poisson_loader(loader, sample_rate, generator=self.generator, dataset=units), "poisson"
        if not self.allow_non_poisson:
            raise DPConfigurationError(
                error_message("poisson_sampling", "True unless `allow_non_poisson_sampling=True`", self.poisson,
                              "The accountant assumes Poisson sampling; other sampling voids its guarantee."))
        logger.warning("poisson_sampling=False: the accountant assumes Poisson sampling at rate %.4g, which this "
                       "loader does not do; the reported ε is not a proven guarantee.", sample_rate)
        if units is not None:
            raise DPConfigurationError(error_message("poisson_sampling", "True with privacy_unit='patient'",
                                                     self.poisson))
        return rebuild_loader(loader, loader.batch_sampler), "loader"


def _without_distributed_sampler(loader: Any, world: int) -> Any:
    """``loader`` without the ``DistributedSampler`` a model-zoo ``multi_gpu_train.json`` gives it (logged).

    Only a sampler over the loader's whole dataset, across this job's ``world`` processes, is dropped: the DP
    trainer shards Poisson sampling over that same dataset itself. Any other sampler is left for
    :func:`~monai_dp.data.poisson.check_loader_sampling` to refuse.
    """
    sampler = getattr(loader, "sampler", None)
    if not (isinstance(sampler, DistributedSampler) and sampler.dataset is loader.dataset
            and sampler.num_replicas == world):
        return loader
    logger.info("train_data_loader.sampler: DistributedSampler over the whole dataset dropped; each of the %d "
                "processes Poisson-samples its share of that dataset instead.", world)
    return rebuild_loader(loader, BatchSampler(SequentialSampler(loader.dataset), loader.batch_size, drop_last=False))


@dataclass(frozen=True)
class DPSetup:
    """What :func:`build_dp_setup` made; the trainer keeps it as ``trainer.dp_setup``."""

    network: torch.nn.Module
    loader: DataLoader
    loader_plan: LoaderPlan
    budget: PrivacyBudget
    optimizer: DPOptimizer
    params: list[tuple[str, torch.nn.Parameter]]
    physical_batch_size: int | None
    amp_dtype: torch.dtype | None
    records_fingerprint: str | None
    clipper: AutoClipper


def build_dp_setup(*, device: str | torch.device, max_epochs: int, epoch_length: int | None, loader: Any,
                   network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: Callable, inferer: Any,
                   amp: bool, amp_kwargs: dict | None, accumulation_steps: int, iteration_update: Callable | None,
                   compile: bool, options: DPOptions) -> DPSetup:
    """Check every argument, then build the loader, the budget, the optimizer and the gradient engines."""
    o = options
    settings = None if o.privacy_budget is not None else DPSettings(
        o.target_epsilon, o.target_delta, o.noise_multiplier, 1.0 if o.max_grad_norm is None else o.max_grad_norm,
        o.accountant or "prv", o.max_physical_batch_size, o.allow_approximate_accounting)
    refuse_unsafe_options(iteration_update, compile)
    check_positive_int("accumulation_steps", accumulation_steps)
    check_positive_int("max_epochs", max_epochs)
    amp_dtype = check_amp(amp, amp_kwargs)
    prepare_loss(loss_function, o.make_compatible)
    network = prepare_network(network, o.make_compatible)
    unit = check_choice("privacy_unit", o.privacy_unit, PRIVACY_UNITS)
    releases = statistics_releases(network)
    if releases and unit != "record":
        raise DPConfigurationError(error_message(
            "privacy_unit", "'record' for a network with released feature statistics", unit,
            f"{releases[0][0]}'s statistics were released at record level; they do not bound a patient's influence."))
    rank, world = rank_world()
    plan = _loader_plan(o, unit, rank, world)
    units, patients = plan.units(loader)
    num_units = dataset_length(loader) if units is None else len(units)
    batch_size = loader_batch_size(loader)
    logical, physical = _batch_sizes(batch_size, accumulation_steps, o.max_physical_batch_size, num_units, unit)
    sample_rate = logical / num_units
    dp_loader, sampling = plan.build(loader, sample_rate, units)
    steps_per_epoch = epoch_length if epoch_length is not None else len(dp_loader)
    fingerprint = records_fingerprint(loader, o.patient_key)
    new = [(name, r) for name, r in releases if not budget_has_release(o.privacy_budget, r)]
    prior = tuple((r["noise_multiplier"], r["sample_rate"], r["steps"]) for _, r in new)
    budget = _budget(o, settings, num_units, unit, sample_rate, sampling, max_epochs, steps_per_epoch, prior)
    budget.patients = patients
    if budget.dataset_id is None or o.dataset_id is not None:
        budget.dataset_id = o.dataset_id if o.dataset_id is not None else fingerprint
    _record_randomness(budget, o)
    for name, release in new:
        budget.compose_release(release, f"{name}.release_statistics()")
    params = trainable_in_optimizer(network, optimizer)
    if world > 1:
        broadcast_parameters(network)
    opt_cls = PrivateNoiseDistributedDPOptimizer if world > 1 else PrivateNoiseDPOptimizer
    # per process: each rank divides by its expected share; the all-reduce then averages over ranks
    dp_optimizer = opt_cls(
        optimizer.original_optimizer if isinstance(optimizer, DPOptimizer) else optimizer,
        noise_multiplier=budget.noise_multiplier, max_grad_norm=budget.max_grad_norm,
        expected_batch_size=logical / world, loss_reduction="mean",
        generator=SecureGaussian() if o.secure_mode else private_generator(device, o.noise_seed),
        secure_mode=o.secure_mode)
    clipper = make_clipper(network, loss_function, inferer, mode=o.grad_sample_mode)
    return DPSetup(network, dp_loader, plan, budget, dp_optimizer, params, physical, amp_dtype, fingerprint, clipper)


def rebuild_training_loader(setup: DPSetup, budget: PrivacyBudget, data: Any) -> DataLoader:
    """A loader set after construction (``set_data``, ``data_loader = ...``), rebuilt like the first one.

    It must hold the same training set (same number of sampled units, same record fingerprint where one can be
    taken): the accounting, its q and the ledger charge belong to that set. It is rebuilt with Poisson sampling
    at the q in force.
    """
    if not isinstance(data, DataLoader):
        raise TypeError(error_message("data", "a torch DataLoader over the training set", type(data).__name__,
                                      "DP training samples the loader's dataset itself (Poisson sampling)."))
    plan, known = setup.loader_plan, setup.records_fingerprint
    units, _ = plan.units(data)
    n = dataset_length(data) if units is None else len(units)
    fingerprint = records_fingerprint(data, plan.patient_key)
    if n != budget.num_units or (fingerprint and known and fingerprint != known):
        raise DPConfigurationError(error_message(
            "data", f"a loader over this trainer's training set ({budget.num_units} {budget.unit}s"
            f"{', fingerprint ' + known if known else ''})",
            f"{n} {budget.unit}s" + (f", fingerprint {fingerprint}" if fingerprint else ""),
            "The accounting belongs to one training set; train on another set with a new trainer."))
    loader, sampling = plan.build(data, budget.sample_rate, units)
    if sampling != budget.sampling:  # pragma: no cover - the plan is the one used at construction
        raise RuntimeError("the rebuilt loader's sampling differs from the accounted one")
    logger.info("A new training loader was set: rebuilt with %s sampling at q = %.4g (as accounted).",
                sampling, budget.sample_rate)
    return loader


def _loader_plan(o: DPOptions, unit: str, rank: int, world: int) -> LoaderPlan:
    if o.secure_mode and (o.noise_seed is not None or o.sampling_seed is not None):
        name = "noise_seed" if o.noise_seed is not None else "sampling_seed"
        raise DPConfigurationError(error_message(
            name, "None with secure_mode=True", getattr(o, name),
            "secure_mode draws the noise and the sampling from the operating system's entropy only."))
    generator = None if world > 1 else private_generator("cpu", o.sampling_seed)
    return LoaderPlan(o.poisson_sampling, o.allow_non_poisson_sampling, o.sampling_seed, rank, world, unit,
                      o.patient_key, o.patient_ids, o.max_records_per_patient, generator)


def _batch_sizes(batch_size: int, accumulation_steps: int, max_physical: int | None, num_units: int,
                 unit: str) -> tuple[int, int | None]:
    """The logical (Poisson, expected) batch and the physical batch of at most so many items."""
    logical = batch_size * accumulation_steps
    if accumulation_steps > 1:
        logger.info("accumulation_steps=%d: logical batch %d items, physical batches of at most %d.",
                    accumulation_steps, logical, batch_size)
        physical = min(batch_size, max_physical or batch_size)
    else:
        physical = max_physical
    if not logical <= num_units:
        raise ValueError(error_message("batch_size * accumulation_steps", f"<= the number of {unit}s N = {num_units}",
                                       logical, "Lower the batch size."))
    return logical, physical


def budget_has_release(budget: PrivacyBudget | None, release: dict) -> bool:
    """Whether a handed-in budget already composes ``release`` (the same statistics, by digest)."""
    return budget is not None and any(p.get("statistics_digest") == release["statistics_digest"] for p in budget.prior)


def _budget(o: DPOptions, settings: DPSettings | None, num_units: int, unit: str, sample_rate: float, sampling: str,
            max_epochs: int, steps_per_epoch: int, prior: tuple = ()) -> PrivacyBudget:
    """The budget handed in (checked against this trainer), or a new one planned over ``planned_*`` (σ calibrated
    over the ``prior`` releases and the planned steps together)."""
    if settings is None:
        return _check_handed_budget(o, num_units, unit, sample_rate, sampling)
    if o.planned_steps is not None:
        planned = check_positive_int("planned_steps", o.planned_steps)
    else:
        epochs = max_epochs if o.planned_epochs is None else check_positive_int("planned_epochs", o.planned_epochs)
        planned = int(epochs) * int(steps_per_epoch)
    delta = resolve_delta(settings.target_delta, num_units, unit)
    plan = PrivacyPlan.create(target_epsilon=settings.target_epsilon, noise_multiplier=settings.noise_multiplier,
                              delta=delta, sample_rate=sample_rate, planned_steps=planned,
                              accountant=settings.accountant, max_grad_norm=settings.max_grad_norm,
                              num_units=num_units, unit=unit, sampling=sampling, prior_history=prior)
    return PrivacyBudget(plan)


def _check_handed_budget(o: DPOptions, num_units: int, unit: str, sample_rate: float, sampling: str) -> PrivacyBudget:
    budget = o.privacy_budget
    if o.max_physical_batch_size is not None:
        check_positive_int("max_physical_batch_size", o.max_physical_batch_size)
    if not isinstance(budget, PrivacyBudget):
        raise TypeError(error_message("privacy_budget", "a monai_dp.privacy.budget.PrivacyBudget (trainer.privacy)",
                                      type(budget).__name__))
    given = {"target_epsilon": o.target_epsilon, "target_delta": o.target_delta, "noise_multiplier": o.noise_multiplier,
             "max_grad_norm": o.max_grad_norm, "accountant": o.accountant, "planned_epochs": o.planned_epochs,
             "planned_steps": o.planned_steps}
    clash = sorted(k for k, v in given.items() if v is not None)
    if clash:
        raise DPConfigurationError(error_message(
            ", ".join(clash), "None with `privacy_budget`", given[clash[0]] if len(clash) == 1 else [given[k] for k in clash],
            "The handed-in budget already fixes σ, δ, C, the accountant and the plan."))
    found = {"privacy_unit": (unit, budget.unit), "number of units N": (num_units, budget.num_units),
             "sample_rate": (sample_rate, budget.plan.sample_rate), "sampling": (sampling, budget.sampling)}
    for name, (mine, theirs) in found.items():
        if mine != theirs:
            raise DPConfigurationError(error_message(
                name, f"{theirs!r} as in the handed-in budget", mine,
                "A budget continues one mechanism on one training set: use the same data, batch size and unit."))
    return budget


def _record_randomness(budget: PrivacyBudget, o: DPOptions) -> None:
    budget.noise_seed = None if o.noise_seed is None else int(o.noise_seed)
    budget.sampling_seed = None if o.sampling_seed is None else int(o.sampling_seed)
    budget.secure_mode = bool(o.secure_mode)
    if o.noise_seed is not None or o.sampling_seed is not None:
        logger.warning("noise_seed=%s, sampling_seed=%s: %s (for tests only; recorded in the checkpoint, "
                       "report and ledger).", o.noise_seed, o.sampling_seed, REPRODUCIBLE_NOISE_WARNING)


def refuse_unsafe_options(iteration_update: Callable | None, compile: bool) -> None:
    if iteration_update is not None:
        raise DPConfigurationError(
            error_message("iteration_update", "None with DP training", getattr(iteration_update, "__name__", iteration_update),
                          "A custom iteration would bypass per-sample clipping and noise; use event handlers."))
    if compile:
        raise DPConfigurationError(error_message("compile", "False with DP training", compile,
                                                 "torch.compile is not supported with per-sample gradients yet."))


def prepare_loss(loss_function: Callable, make_compatible: bool) -> Callable:
    """The loss, made per-example where that is a reduction switch (``make_compatible``, logged), else checked."""
    if make_compatible:
        make_per_sample_loss(loss_function)  # in place: the trainer's loss_function is this object
    check_per_sample_loss(loss_function)
    return loss_function


_DATA_PARALLEL = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)


def unwrap_data_parallel(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (a model-zoo ``multi_gpu_train.json``
    wraps ``network_def`` in DDP), logged.

    DDP averages raw gradients, which would bypass per-sample clipping and noise; the DP trainer trains the
    wrapped module and, under ``torch.distributed``, all-reduces the clipped, noised sums itself
    (``PrivateNoiseDistributedDPOptimizer``). The wrapper stays usable for evaluation (same parameters).
    """
    while isinstance(network, _DATA_PARALLEL):
        logger.info("network: %s unwrapped; its module (%s) is trained. The DP optimizer all-reduces the clipped, "
                    "noised gradient sums across processes instead of the wrapper's averaging of raw gradients.",
                    type(network).__name__, type(network.module).__name__)
        network = network.module
    return network


def _refresh_wrapper_buffers(wrapper: torch.nn.Module) -> None:
    """After the wrapped module was converted in place, DDP's list of buffers to broadcast before a forward (taken
    at construction: BatchNorm's running statistics) is stale, and its next forward (validation) fails inside
    torch. DDP re-reads the module's buffers with this method (torch 2.x; a torch without it needs nothing)."""
    while isinstance(wrapper, _DATA_PARALLEL):
        reassign = getattr(wrapper, "_assign_modules_buffers", None)
        if callable(reassign):
            reassign()
        wrapper = wrapper.module


def prepare_network(network: torch.nn.Module, make_compatible: bool) -> torch.nn.Module:
    if not isinstance(network, torch.nn.Module):
        raise TypeError(error_message("network", "a torch.nn.Module", type(network).__name__))
    wrapper, network = network, unwrap_data_parallel(network)
    if make_compatible:
        network, report = make_private_compatible(network)
        if len(report):
            logger.info("%s", report.summary())
            logger.debug("%s", report)
            _refresh_wrapper_buffers(wrapper)
        return network
    offenders = find_incompatible_modules(network)
    if offenders:
        raise DPIncompatibleModuleError(offenders)
    return network


def trainable_in_optimizer(network: torch.nn.Module, optimizer: Any) -> list[tuple[str, torch.nn.Parameter]]:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(error_message("optimizer", "a torch.optim.Optimizer", type(optimizer).__name__))
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
    named = [(n, p) for n, p in network.named_parameters() if id(p) in in_opt]
    missing = len(in_opt) - len(named)
    if missing:
        raise ValueError(error_message("optimizer", "built on the parameters of `network`", f"{missing} parameter(s) not in it",
                                       "Build the optimizer from network.parameters()."))
    if not named:
        raise ValueError(error_message("optimizer", "holding trainable parameters", "none"))
    return named
