"""Every public door that changes what is sampled, noised or counted is accounted or refused (issue 11).

Each test checks the guarantee itself against something independent of the trainer: the weights of two runs,
the noise read back from the weights, an independent accountant (Google's dp-accounting) over the σ that was
really used, the updates the weights carry.
"""

from __future__ import annotations

import copy
import logging

import dp_accounting
import pytest
import torch
from scipy import stats
from ignite.engine import Engine, Events
from monai.data import DataLoader, MetaTensor
from monai.utils import set_determinism
from opacus.schedulers import StepNoise
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.engines.optimizer import PrivateNoiseDPOptimizer
from monai_dp.handlers import PrivacyAccountantHandler
from monai_dp.handlers.privacy_report_handler import privacy_report
from monai_dp.utils.errors import DPConfigurationError, NonFiniteGradientError
from monai_dp.utils.randomness import SecureGaussian
from tests.conftest import TinyClassifier, make_classification_data


def Wide(size: int = 8, out: int = 400) -> nn.Module:  # noqa: N802 - used like a class
    """A linear layer with many weights: the noise actually added can be read back from one update."""
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, out))


class ZeroLoss(nn.Module):
    """A loss whose gradient is zero: the update is the noise alone."""

    def forward(self, pred, target):
        return (pred * 0.0).mean()


def _trainer(net=None, data=None, batch_size=4, max_epochs=1, loss=None, lr=0.1, **kw):
    data = make_classification_data(n=40) if data is None else data
    net = TinyClassifier() if net is None else net
    kw.setdefault("max_grad_norm", 1.0)
    if "target_epsilon" not in kw:
        kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("target_delta", 1e-3)
    kw.setdefault("grad_sample_mode", "per_sample")
    return DPSupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=DataLoader(data, batch_size=batch_size),
                               network=net, optimizer=torch.optim.SGD(net.parameters(), lr=lr),
                               loss_function=loss or nn.CrossEntropyLoss(), **kw)


def _weights(trainer):
    return torch.cat([p.detach().flatten().clone() for p in trainer.network.parameters()])


def _pld_epsilon(history, delta):
    """ε of a history of (σ, q, steps) by dp-accounting's PLD accountant (independent of monai_dp)."""
    acc = dp_accounting.pld.PLDAccountant()
    for sigma, q, n in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(n))
    return acc.get_epsilon(delta)


# ---------------------------------------------------------------- item 1: predictable noise and sampling
@pytest.mark.parametrize("seeding", ["set_determinism", "manual_seed"])
def test_global_seeds_do_not_make_dp_weights_reproducible(seeding):
    """Two runs under the same global seed must not give the same DP weights (replay = membership inference).

    The sampling is seeded here, so only the noise can make the runs differ."""
    results = []
    for _ in range(2):
        if seeding == "set_determinism":
            set_determinism(seed=0)
        torch.manual_seed(0)
        trainer = _trainer(TinyClassifier(), sampling_seed=7)
        torch.manual_seed(0)
        trainer.run()
        results.append(_weights(trainer))
    set_determinism(seed=None)
    assert not torch.equal(results[0], results[1])


def test_global_seeds_do_not_fix_the_poisson_sample():
    batches = []
    for _ in range(2):
        torch.manual_seed(0)
        trainer = _trainer()
        sampler = trainer.data_loader.batch_sampler
        assert isinstance(sampler, UniformWithReplacementSampler)
        torch.manual_seed(0)
        batches.append([tuple(b) for b in sampler])
    assert batches[0] != batches[1]


def test_a_noise_seed_is_warned_recorded_and_reproducible(caplog):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = TinyClassifier()
        with caplog.at_level(logging.WARNING, logger="monai_dp.engines.trainer"):
            trainer = _trainer(net, noise_seed=5, sampling_seed=3)
        trainer.run()
        runs.append(_weights(trainer))
    assert torch.equal(runs[0], runs[1])  # the seed does what it says: the run can be replayed
    assert "reproducible noise: not private against someone who knows the seed" in caplog.text
    assert trainer.state_dict()["privacy"]["noise_seed"] == 5
    randomness = privacy_report(trainer)["randomness"]
    assert randomness["noise_seed"] == 5 and "not private" in randomness["warning"]


@pytest.mark.parametrize("seed_arg", ["noise_seed", "sampling_seed"])
def test_secure_mode_refuses_seeds(seed_arg):
    with pytest.raises(DPConfigurationError, match=rf"`{seed_arg}` must be None with secure_mode=True, got 123"):
        _trainer(secure_mode=True, **{seed_arg: 123})


def _one_noisy_update(secure, seed=0, sigma=1.0, clip=1.0, n=200_000):
    params = [nn.Parameter(torch.zeros(n))]
    generator = SecureGaussian() if secure else torch.Generator().manual_seed(seed)
    opt = PrivateNoiseDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                                  expected_batch_size=1, generator=generator, secure_mode=secure)
    for _ in range(2):  # two steps: the second must not repeat the first
        params[0].data.zero_()
        opt.zero_grad()
        params[0].grad_sample = torch.zeros(0, n)
        opt.step()
        yield -params[0].detach().clone()


def test_secure_mode_noise_is_a_fresh_gaussian_every_step():
    first, second = _one_noisy_update(True)
    assert not torch.equal(first, second)
    for noise in (first, second):
        assert stats.kstest(noise.numpy(), "norm").statistic < 0.01  # N(0, σC), σC = 1
    torch.manual_seed(0)
    a = next(_one_noisy_update(True))
    torch.manual_seed(0)
    b = next(_one_noisy_update(True))
    assert not torch.equal(a, b)  # no global seed reaches it


def test_plain_noise_has_the_right_scale():
    noise = next(_one_noisy_update(False, sigma=0.5, clip=2.0))
    assert stats.kstest(noise.numpy(), "norm").statistic < 0.01  # σC = 1


def test_secure_mode_refuses_a_torch_generator():
    params = [nn.Parameter(torch.zeros(3))]
    opt = PrivateNoiseDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                                  expected_batch_size=1, generator=torch.Generator(), secure_mode=True)
    params[0].grad_sample = torch.zeros(0, 3)
    with pytest.raises(RuntimeError, match="secure_mode needs a SecureGaussian"):
        opt.step()


def test_secure_mode_trains_and_reseeds_sampling_every_epoch():
    trainer = _trainer(secure_mode=True, max_epochs=2)
    assert isinstance(trainer.optimizer.generator, SecureGaussian)
    gen = trainer.data_loader.batch_sampler.generator
    states = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: states.append(gen.get_state().clone()))
    trainer.run()
    assert trainer.dp_steps == 20 and len(states) == 2 and not torch.equal(states[0], states[1])


# ---------------------------------------------------------------- item 2: σ changed after calibration
def _sigma_from_update(before, after, trainer, lr):
    """σ actually used, read back from a noise-only update: Δw = -lr · N(0, σC) / E[B]."""
    delta = (after - before) * trainer.optimizer.expected_batch_size / (lr * trainer.optimizer.max_grad_norm)
    return float(delta.std())


def _halve_sigma_every_epoch_and_read_it_back(trainer, lr) -> list[float]:
    """Opacus' StepNoise halves σ after every epoch; the σ of every step is read back from the weights."""
    scheduler = StepNoise(trainer.optimizer, step_size=1, gamma=0.5)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: scheduler.step())
    used, last = [], {"w": _weights(trainer)}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _read_noise(engine):
        w = _weights(engine)
        used.append(_sigma_from_update(last["w"], w, engine, lr))
        last["w"] = w

    return used


def test_noise_schedule_is_accounted_at_the_sigma_really_used():
    lr = 1.0
    trainer = _trainer(Wide(), loss=ZeroLoss(), max_epochs=3, lr=lr, noise_multiplier=2.0)
    used = _halve_sigma_every_epoch_and_read_it_back(trainer, lr)
    trainer.run()
    q = trainer.privacy.sample_rate
    assert len(used) == trainer.dp_steps == 30
    for sigma_read, (epoch_sigma) in zip(used, [2.0] * 10 + [1.0] * 10 + [0.5] * 10):
        assert sigma_read == pytest.approx(epoch_sigma, rel=0.03)
    # the independent accountant, over σ read back from the weights (rounded up 3 %: never in the trainer's favour)
    reference = _pld_epsilon([(s * 1.03, q, 1) for s in used], 1e-3)
    assert trainer.get_epsilon() >= reference
    assert trainer.privacy.accountant.history == [(2.0, q, 10), (1.0, q, 10), (0.5, q, 10)]


def test_a_lowered_sigma_stops_training_at_the_budget():
    lr = 1.0
    trainer = _trainer(Wide(), loss=ZeroLoss(), max_epochs=20, lr=lr, noise_multiplier=4.0, target_epsilon=3.0)
    used = _halve_sigma_every_epoch_and_read_it_back(trainer, lr)
    trainer.run()
    assert trainer.state.dp_budget_exhausted and trainer.dp_steps < 200
    spent = _pld_epsilon([(s * 0.97, trainer.privacy.sample_rate, 1) for s in used], 1e-3)
    assert spent <= 3.0 * 1.02  # the noise really added stayed within the budget (σ read back, rounded down)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_noise_multiplier_without_noise_is_refused(bad):
    trainer = _trainer()
    trainer.optimizer.noise_multiplier = bad
    with pytest.raises(DPConfigurationError, match=r"`optimizer.noise_multiplier` must be a finite number > 0"):
        trainer.run()


# ---------------------------------------------------------------- item 3: loaders set after construction
def _batch_sizes(trainer, epoch):
    sizes = []

    @trainer.on(Events.ITERATION_STARTED)
    def _size(engine):
        if engine.state.epoch == epoch:
            batch = engine.state.batch
            sizes.append(len(batch["label"]) if "label" in batch else 0)

    return sizes


def test_set_data_is_rebuilt_with_poisson_sampling_at_the_accounted_rate():
    data = make_classification_data(n=40)
    trainer = _trainer(data=data, max_epochs=2)
    full_batch = DataLoader(data, batch_size=len(data))
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.set_data(full_batch))
    sizes = _batch_sizes(trainer, epoch=2)
    trainer.run()
    sampler = trainer.state.dataloader.batch_sampler
    assert isinstance(sampler, UniformWithReplacementSampler) and sampler.sample_rate == 0.1
    assert trainer.state.dataloader is trainer.data_loader
    assert len(sizes) == 10 and max(sizes) < len(data)  # Poisson batches of about 4, not 40
    assert trainer.privacy.accountant.history == [(1.0, 0.1, 20)]


def test_assigning_data_loader_rebuilds_it():
    data = make_classification_data(n=40)
    trainer = _trainer(data=data)
    trainer.data_loader = DataLoader(data, batch_size=40)
    assert isinstance(trainer.data_loader.batch_sampler, UniformWithReplacementSampler)


def test_set_data_with_another_training_set_is_refused():
    trainer = _trainer(data=make_classification_data(n=40))
    with pytest.raises(DPConfigurationError, match=r"`data` must be a loader over this trainer's training set \(40 "):
        trainer.set_data(DataLoader(make_classification_data(n=50), batch_size=4))
    with pytest.raises(TypeError, match=r"`data` must be a torch DataLoader"):
        trainer.set_data([{"image": torch.zeros(1, 1, 8, 8), "label": torch.zeros(1)}])


def test_a_loader_swapped_behind_the_trainers_back_is_refused():
    data = make_classification_data(n=40)
    trainer = _trainer(data=data, max_epochs=2)
    # Ignite's own set_data, bypassing the trainer's: the next iteration must not run on it
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1),
                              lambda e: Engine.set_data(e, DataLoader(data, batch_size=len(data))))
    with pytest.raises(DPConfigurationError, match=r"`engine.state.dataloader` must be the trainer's own"):
        trainer.run()
    assert trainer.dp_steps == trainer.state.iteration == 10


# ---------------------------------------------------------------- item 5: rewinding the accounting
def _train_with_snapshot(epochs=3, snapshot_epoch=1):
    trainer = _trainer(max_epochs=epochs)
    snap = {}

    @trainer.on(Events.EPOCH_COMPLETED(once=snapshot_epoch))
    def _snapshot(engine):
        snap["trainer"] = copy.deepcopy(engine.state_dict())
        snap["network"] = copy.deepcopy(engine.network.state_dict())
        snap["optimizer"] = copy.deepcopy(engine.optimizer.state_dict())

    trainer.run()
    return trainer, snap


def test_loading_older_accounting_into_a_trained_trainer_is_refused():
    trainer, snap = _train_with_snapshot()
    applied = trainer.dp_steps
    assert applied == 30
    trainer.load_state_dict(snap["trainer"])  # the weights still carry 30 updates
    for query in (trainer.get_epsilon, trainer.state_dict, trainer.privacy.allows_step):
        with pytest.raises(DPConfigurationError, match=r"`load_state_dict` must be given the network and optimizer "
                                                       r"of the same checkpoint.*10 steps on weights that carry 30"):
            query()
    with pytest.raises(DPConfigurationError, match="never goes backwards"):
        trainer.run()


@pytest.mark.parametrize("order", ["trainer_last", "trainer_first"])
def test_rewinding_with_the_checkpoints_own_weights_is_allowed(order):
    trainer, snap = _train_with_snapshot()
    loads = [lambda: trainer.network.load_state_dict(snap["network"]),
             lambda: trainer.optimizer.load_state_dict(snap["optimizer"]),
             lambda: trainer.load_state_dict(snap["trainer"])]
    for load in loads if order == "trainer_last" else loads[::-1]:
        load()
    assert trainer.dp_steps == 10
    assert trainer.get_epsilon() == pytest.approx(_pld_epsilon([(1.0, 0.1, 10)], 1e-3), rel=0.02)


def test_the_accountant_handler_cannot_rewind_either():
    trainer, snap = _train_with_snapshot()
    handler = next(h for h in _handlers(trainer) if isinstance(h, PrivacyAccountantHandler))
    handler.load_state_dict(snap["trainer"]["privacy"])
    with pytest.raises(DPConfigurationError, match="never goes backwards"):
        trainer.get_epsilon()


def _handlers(trainer):
    for handlers in trainer._event_handlers.values():
        for h, _, _ in handlers:
            yield getattr(h, "__self__", h)


def test_a_checkpoint_whose_history_is_shorter_than_its_iterations_is_refused():
    trainer, _ = _train_with_snapshot(epochs=1)
    sd = copy.deepcopy(trainer.state_dict())
    sd["privacy"]["accountant"]["history"] = []
    fresh = _trainer()
    with pytest.raises(ValueError, match=r"`state_dict\['privacy'\]` must be an accounting of at least "
                                         r"state_dict\['iteration'\] = 10 steps, got '0 steps'"):
        fresh.load_state_dict(sd)
    assert fresh.dp_steps == 0 and fresh.state.iteration == 0  # nothing was loaded


def test_the_budget_stop_leaves_iterations_equal_to_steps_and_resumes():
    trainer = _trainer(max_epochs=50, target_epsilon=2.0, noise_multiplier=1.0)
    trainer.run()
    assert trainer.state.dp_budget_exhausted and trainer.state.iteration == trainer.dp_steps
    again = _trainer(max_epochs=50, target_epsilon=2.0, noise_multiplier=1.0)
    again.load_state_dict(trainer.state_dict())
    again.network.load_state_dict(trainer.network.state_dict())
    again.run()
    assert again.dp_steps == trainer.dp_steps and again.get_epsilon() <= 2.0


# ---------------------------------------------------------------- item 10: non-finite values
def _data_with(value, n=12):
    data = make_classification_data(n=n)
    for i, record in enumerate(data):
        record["image"] = MetaTensor(record["image"], meta={"filename_or_obj": f"case_{i:03d}.nii.gz"})
    data[7]["image"][0, 3, 3] = value
    return data


@pytest.mark.parametrize("mode", ["per_sample", "ghost"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])
def test_a_non_finite_record_stops_training_naming_it_and_nothing_is_applied(mode, value):
    data = _data_with(value)
    trainer = _trainer(net=Wide(out=2), data=data, batch_size=len(data), grad_sample_mode=mode, max_epochs=3)
    before = _weights(trainer)
    if value == 3e38 and mode == "per_sample":
        # finite: this record's loss saturates and its exact gradient is finite (here 0), so it is clipped as usual
        trainer.run()
        assert trainer.dp_steps == 3 and torch.isfinite(_weights(trainer)).all()
        return
    # (ghost clipping's norms of a 3e38 pixel overflow float32: caught here instead of a NaN model)
    with pytest.raises(NonFiniteGradientError, match=r"record 'case_007.nii.gz' \(row 7 of the batch\) is not "
                                                    r"finite.*epoch 1, iteration 1. Nothing of this step was applied"):
        trainer.run()
    assert torch.equal(_weights(trainer), before)
    assert trainer.dp_steps == 1  # the sampling happened: the step is accounted
    assert torch.isfinite(_weights(trainer)).all()


# ---------------------------------------------------------------- item 4 (trainer side): the cross-check under amp
def test_auto_mode_cross_checks_ghost_clipping_also_under_bf16(monkeypatch):
    trainer = _trainer(net=Wide(out=2), grad_sample_mode="auto", amp=True)
    assert trainer.ghost is not None
    real = trainer.ghost.clipped_sum

    def wrong(*args, **kwargs):  # ghost clipping that gets the clipped sum wrong by a factor of 2
        out = real(*args, **kwargs)
        return out._replace(summed={n: 2 * g for n, g in out.summed.items()})

    monkeypatch.setattr(trainer.ghost, "clipped_sum", wrong)
    with pytest.raises(RuntimeError, match=r"clipped sum of `1.weight`` must be the same by ghost clipping"):
        trainer.run()



# ---------------------------------------------------------------- item 11 (trainer side): labels out of range
@pytest.mark.parametrize("mode", ["per_sample", "ghost"])
def test_labels_out_of_range_get_one_clear_error_in_every_mode(mode):
    data = make_classification_data(n=12)
    data[5]["label"] = torch.tensor(7)
    trainer = _trainer(net=Wide(out=2), data=data, batch_size=len(data), grad_sample_mode=mode)
    with pytest.raises(ValueError, match=r"`targets` must be class indices in \[0, 2\).*got 7"):
        trainer.run()


def test_ambiguous_patient_ids_are_refused_at_patient_level():
    ids = [i // 2 for i in range(12)]
    ids[3] = "1.0"  # patient 1 spelled a second way: one patient would be sampled (and clipped) as two
    with pytest.raises(ValueError, match=r"`patient_ids` must spell each patient id one way, got 1 \(record 2\) and '1.0' \(record 3\)"):
        _trainer(data=make_classification_data(n=12), privacy_unit="patient", batch_size=2, patient_ids=ids)


def test_a_loaded_history_is_what_the_next_budget_check_uses():
    """The budget check's cached step limit must not survive a load: the loaded history may spend faster."""
    spender = _trainer(noise_multiplier=0.6, max_epochs=3)
    spender.run()  # 30 steps at σ = 0.6
    assert spender.get_epsilon() > 3.0
    capped = _trainer(noise_multiplier=2.0, target_epsilon=3.0, max_epochs=3)
    assert capped.privacy.allows_step()  # caches the limit for σ = 2 from zero steps
    capped.load_state_dict(spender.state_dict())
    assert capped.dp_steps == 30
    assert not capped.privacy.allows_step()
    capped.run()
    assert capped.dp_steps == 30 and capped.state.dp_budget_exhausted


def test_an_optimizer_swapped_in_after_construction_is_refused():
    trainer = _trainer()
    before = _weights(trainer)
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.1)
    with pytest.raises(DPConfigurationError, match=r"`trainer.optimizer` must be the DP optimizer the trainer built"):
        trainer.run()
    assert torch.equal(_weights(trainer), before) and trainer.dp_steps == 0  # refused before the batch is used
