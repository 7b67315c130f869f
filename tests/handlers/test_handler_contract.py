"""Contract suite over every handler: idempotent attach, plain state, round trip through weights-only loading.

The handlers are discovered from ``monai_dp.handlers.__all__``; each needs an entry in ``CONTRACT`` saying how to
build it with non-default arguments, how to build a default one, and how to run a trainer so that its state is
no longer the default. A handler added to the package without an entry fails ``test_every_handler_is_covered``.
Tests of one handler's own behaviour live in ``tests/handlers/test_<handler file>.py``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from ignite.engine import Engine

import monai_dp.handlers as handlers_pkg
from monai_dp.handlers import (
    EMAWeightsHandler,
    PrivacyAccountantHandler,
    PrivacyBudgetHandler,
    PrivacyLedgerHandler,
    PrivacyReportHandler,
)
from monai_dp.privacy.ledger import PrivacyLedger
from tests.engines.test_trainer import make_trainer

DELTA = 1e-3


DATASET_ID = "contract-suite-data"


def _ledger(tmp_path) -> str:
    """A ledger holding the dataset ``DATASET_ID``, with room for far more than one run."""
    path = str(tmp_path / "ledger.db")
    PrivacyLedger(path).init_dataset(DATASET_ID, epsilon=50.0, delta=DELTA)
    return path


# class -> (build with non-default arguments, build with defaults, trainer arguments for a run that changes state);
# the builders get the test's directory and the trainer the handler will be attached to
CONTRACT = {
    PrivacyAccountantHandler: (
        lambda tmp, trainer: PrivacyAccountantHandler(delta=1e-4, epsilon_key="eps_1e-4", iteration_interval=3),
        lambda tmp, trainer: PrivacyAccountantHandler(),
        {"max_epochs": 1},
    ),
    PrivacyBudgetHandler: (
        lambda tmp, trainer: PrivacyBudgetHandler(target_epsilon=2.0),
        lambda tmp, trainer: PrivacyBudgetHandler(),
        {"max_epochs": 20},  # the cap of 2.0 stops this run early
    ),
    PrivacyLedgerHandler: (
        lambda tmp, trainer: PrivacyLedgerHandler(_ledger(tmp), dataset_id=DATASET_ID, note="contract suite"),
        lambda tmp, trainer: PrivacyLedgerHandler(str(tmp / "ledger.db")),
        {"max_epochs": 1},
    ),
    EMAWeightsHandler: (
        lambda tmp, trainer: EMAWeightsHandler(trainer.network, decay=0.5, start_step=3),
        lambda tmp, trainer: EMAWeightsHandler(trainer.network),
        {"max_epochs": 1},
    ),
    PrivacyReportHandler: (
        lambda tmp, trainer: PrivacyReportHandler(report_file=str(tmp / "models" / "privacy_report.json")),
        lambda tmp, trainer: PrivacyReportHandler(report_file=str(tmp / "other" / "privacy_report.json")),
        {"max_epochs": 1},
    ),
}


def _package_handlers() -> set:
    found = (getattr(handlers_pkg, name) for name in handlers_pkg.__all__)
    return {obj for obj in found if inspect.isclass(obj) and obj.__name__.endswith("Handler")}


def test_every_handler_is_covered():
    assert _package_handlers() == set(CONTRACT), "add every handler of monai_dp.handlers to CONTRACT"


def _footprint(engine, handler) -> tuple:
    """What attaching ``handler`` leaves on ``engine``: its event registrations and the budget's gates (if any)."""
    def mine(h):
        return getattr(h, "__self__", h) is handler

    registrations = sorted((str(ev), sum(mine(h) for h, *_ in hs)) for ev, hs in engine._event_handlers.items())
    gates = tuple(str(getattr(g, "name", g)) for g in getattr(engine.privacy, "gates", ()))
    return tuple(r for r in registrations if r[1]), gates


def _assert_plain(value, where="state") -> None:
    """Only what ``torch.load(weights_only=True)`` accepts and compares by value: no enums, dataclasses, objects."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _assert_plain(v, f"{where}[{i}]")
        return
    assert type(value) is dict, f"{where} is a {type(value).__name__}"
    for k, v in value.items():
        assert isinstance(k, (str, int)), f"{where} has a key of type {type(k).__name__}"
        _assert_plain(v, f"{where}[{k!r}]")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("cls", list(CONTRACT), ids=lambda c: c.__name__)
def test_attach_is_idempotent(cls, tmp_path):
    make, _, _ = CONTRACT[cls]
    trainer = make_trainer(target_delta=DELTA, target_epsilon=50.0)
    handler = make(tmp_path, trainer)
    before = _footprint(trainer, handler)
    handler.attach(trainer)
    after_one = _footprint(trainer, handler)
    handler.attach(trainer)
    assert _footprint(trainer, handler) == after_one != before


@pytest.mark.parametrize("cls", list(CONTRACT), ids=lambda c: c.__name__)
def test_state_is_plain_and_round_trips(cls, tmp_path):
    make, make_default, run_kw = CONTRACT[cls]
    trainer = make_trainer(target_delta=DELTA, **run_kw)
    handler = make(tmp_path, trainer)
    handler.attach(trainer)
    trainer.run()
    state = handler.state_dict()
    _assert_plain(state)
    default_state = make_default(tmp_path, trainer).state_dict()
    assert not _same(state, default_state), "the run must leave non-default state, or the round trip shows nothing"

    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = make_default(tmp_path, trainer)
    fresh.load_state_dict(loaded)
    assert _same(fresh.state_dict(), state)
    # what is loaded is copied, not shared: changing the file's dict later does not change the handler
    loaded.clear()
    assert _same(fresh.state_dict(), state)


# handlers that read no privacy state: they work on any engine (the averaged weights of a non-private baseline)
ANY_ENGINE = {EMAWeightsHandler}


@pytest.mark.parametrize("cls", [c for c in CONTRACT if c not in ANY_ENGINE], ids=lambda c: c.__name__)
def test_refuses_a_non_dp_engine(cls, tmp_path):
    with pytest.raises(TypeError, match=r"`engine` must be a DP trainer"):
        CONTRACT[cls][0](tmp_path, make_trainer(target_delta=DELTA)).attach(Engine(lambda e, b: None))


@pytest.mark.parametrize("cls", sorted(ANY_ENGINE, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_any_engine_handler_works_on_a_plain_engine(cls, tmp_path):
    trainer = make_trainer(target_delta=DELTA)
    handler = CONTRACT[cls][0](tmp_path, trainer)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    assert not _same(handler.state_dict(), CONTRACT[cls][1](tmp_path, trainer).state_dict())  # it ran


@pytest.mark.parametrize("cls", list(CONTRACT), ids=lambda c: c.__name__)
def test_load_state_dict_type_checked(cls, tmp_path):
    with pytest.raises(TypeError, match=r"`state_dict` must be a dict, got 'list'"):
        CONTRACT[cls][1](tmp_path, make_trainer(target_delta=DELTA)).load_state_dict([1, 2])
