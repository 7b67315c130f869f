"""EMAWeightsHandler: the average follows its recurrence over the iterates the DP trainer really produced, the
evaluator sees the average and training continues from its own iterate, and the state round-trips."""

from __future__ import annotations

import io

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.handlers.ema_weights_handler import EMAWeightsHandler
from tests.conftest import make_classification_data


def _flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in net.parameters()])


def test_average_is_the_recurrence_over_set_weights_and_attach_is_idempotent():
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(0.0), net.bias.fill_(0.0)
    ema = EMAWeightsHandler(net, decay=0.25, start_step=2)

    def step(engine, batch):
        with torch.no_grad():
            net.weight.fill_(float(batch)), net.bias.fill_(-float(batch))

    engine = Engine(step)
    ema.attach(engine)
    ema.attach(engine)  # a second attach must not update twice per iteration
    engine.run([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], max_epochs=1)
    # the iterate for the first 2 steps (start_step), then the warm-up decay 2/11, then 0.25 (= 3/12 < 4/13 < ...)
    expected = 2.0
    for w, d in ((4.0, 2 / 11), (8.0, 0.25), (16.0, 0.25), (32.0, 0.25)):
        expected = d * expected + (1 - d) * w
    assert ema.num_updates == 6
    assert ema.average[0] == pytest.approx(torch.full((1, 2), expected))
    assert ema.average[1] == pytest.approx(torch.full((1,), -expected))


def test_evaluator_sees_the_average_of_the_dp_iterates_and_training_continues_from_its_iterate():
    data = make_classification_data(n=48, size=4)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    seen: dict[str, list[torch.Tensor]] = {"eval": [], "iterate": [], "after": []}
    evaluator = Engine(lambda engine, batch: seen["eval"].append(_flat(net)))
    ema = EMAWeightsHandler(net, decay=0.5, evaluator=evaluator)
    trainer = DPSupervisedTrainer(
        device="cpu", max_epochs=2, train_data_loader=DataLoader(data, batch_size=12), network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=1.0), loss_function=nn.CrossEntropyLoss(),
        train_handlers=[ema], noise_multiplier=1.0, max_grad_norm=1.0, sampling_seed=0, noise_seed=0,
        decollate=False, grad_sample_mode="per_sample")
    expected = _flat(net)  # the recurrence, by hand, from the initial weights over those after every noisy step
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen["iterate"].append(_flat(net)))

    def validate(engine):
        before = _flat(net)
        evaluator.run([0], max_epochs=1)
        seen["after"].append((before, _flat(net)))

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    trainer.run()
    for m, w in enumerate(seen["iterate"], start=1):
        d = min(0.5, (1 + m) / (10 + m))  # warm-up 2/11, 3/12, ..., then 0.5 from the 8th step
        expected = d * expected + (1 - d) * w
    assert ema.num_updates == trainer.dp_steps == len(seen["iterate"]) > 4
    assert torch.allclose(torch.cat([a.flatten() for a in ema.average]), expected, atol=1e-6)
    assert len(seen["eval"]) == 2
    assert torch.allclose(seen["eval"][-1], expected, atol=1e-6)  # the evaluator ran on the average ...
    assert not torch.allclose(seen["eval"][-1], seen["iterate"][-1], atol=1e-3)  # ... which is not the iterate
    for before, after in seen["after"]:  # and the trainer got its own iterate back
        assert torch.equal(before, after)


def test_state_round_trips_through_weights_only_load():
    net = nn.Linear(3, 2)
    ema = EMAWeightsHandler(net, decay=0.9)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = EMAWeightsHandler(nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.average, ema.average))
    with pytest.raises(ValueError, match=r"`state_dict\['average'\]` must be tensors shaped like the network's"):
        EMAWeightsHandler(nn.Linear(4, 2)).load_state_dict(ema.state_dict())


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`decay` must be a number in \[0, 1\), got 1.0"):
        EMAWeightsHandler(nn.Linear(2, 1), decay=1.0)
    with pytest.raises(ValueError, match="`start_step` must be an int >= 0, got -1"):
        EMAWeightsHandler(nn.Linear(2, 1), start_step=-1)
    with pytest.raises(TypeError, match="`network` must be a torch.nn.Module, got 'list'"):
        EMAWeightsHandler([], decay=0.9)


def _setting_engine(net: nn.Module) -> Engine:
    def step(engine, batch):
        with torch.no_grad():
            net.weight.fill_(float(batch)), net.bias.fill_(-float(batch))

    return Engine(step)


def test_an_average_saved_beside_other_weights_is_refused_before_it_is_used():
    """An EMA state from another run (another data set) would flow into the evaluated and saved model with only
    this run's accounting: it is refused unless the network holds the weights it was saved beside."""
    from monai_dp.utils.errors import DPConfigurationError

    run_a = nn.Linear(2, 1)
    ema_a = EMAWeightsHandler(run_a, decay=0.5)
    engine_a = _setting_engine(run_a)
    ema_a.attach(engine_a)
    engine_a.run([3.0, 5.0], max_epochs=1)
    saved = torch.load(io.BytesIO(_saved(ema_a)), weights_only=True)

    run_b = nn.Linear(2, 1)  # other weights: a fresh run on other data
    ema_b = EMAWeightsHandler(run_b, decay=0.5)
    engine_b = _setting_engine(run_b)
    ema_b.attach(engine_b)
    ema_b.load_state_dict(saved)
    with pytest.raises(DPConfigurationError, match="EMAWeightsHandler state"):
        engine_b.run([7.0], max_epochs=1)
    with pytest.raises(DPConfigurationError, match="EMAWeightsHandler state"):
        ema_b.swap_in()

    # beside the weights it was saved with (a resumed run), it is used
    run_c = nn.Linear(2, 1)
    run_c.load_state_dict(run_a.state_dict())
    ema_c = EMAWeightsHandler(run_c, decay=0.5)
    engine_c = _setting_engine(run_c)
    ema_c.attach(engine_c)
    ema_c.load_state_dict(saved)
    engine_c.run([7.0], max_epochs=1)
    assert ema_c.num_updates == 3
    with pytest.raises(ValueError, match="iterate_digest"):
        EMAWeightsHandler(nn.Linear(2, 1)).load_state_dict({k: v for k, v in saved.items() if k != "iterate_digest"})


def _saved(ema: EMAWeightsHandler) -> bytes:
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    return buffer.getvalue()


def test_a_failing_evaluator_leaves_the_training_iterate_in_the_network():
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(3.0), net.bias.fill_(3.0)
    evaluator = Engine(lambda engine, batch: (_ for _ in ()).throw(RuntimeError("evaluation failed")))
    ema = EMAWeightsHandler(net, decay=0.5, evaluator=evaluator)
    ema.attach(Engine(lambda engine, batch: None))
    with torch.no_grad():
        net.weight.fill_(5.0), net.bias.fill_(5.0)  # the iterate now differs from the average (3.0)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        evaluator.run([1], max_epochs=1)
    assert torch.equal(_flat(net), torch.full((3,), 5.0))
