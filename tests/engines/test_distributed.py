"""Two processes (gloo, CPU): the all-reduced DP step equals one DP-SGD step over the union of their batches."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monai_dp.data import GROUP_KEY
from tests.conftest import TinyClassifier, make_classification_data
from tests.engines.test_dp_step import CLIP, SEED, SIGMA, _reference_update

RANK_ROWS = {0: [0, 3, 5], 1: [8, 9, 11, 12]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from monai.data import DataLoader

        from monai_dp.engines import DPSupervisedTrainer

        torch.manual_seed(100 + rank)  # different init per rank: the trainer must broadcast rank 0's weights
        net = TinyClassifier()
        data = make_classification_data(n=40)
        trainer = DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(data, batch_size=4),
                                      network=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                                      loss_function=torch.nn.CrossEntropyLoss(), noise_multiplier=SIGMA,
                                      max_grad_norm=CLIP, noise_seed=SEED, target_delta=1e-3)
        assert len(trainer.data_loader) == 10  # int(1 / q) steps per epoch on every rank
        rows = [data[i] for i in RANK_ROWS[rank]]
        batch = {"image": torch.stack([r["image"] for r in rows]), "label": torch.stack([r["label"] for r in rows]),
                 GROUP_KEY: torch.arange(len(rows))}
        initial = [p.detach().clone() for p in trainer.network.parameters()]
        trainer.state.iteration = 1
        trainer.state.device = torch.device("cpu")
        trainer._iteration(trainer, batch)
        torch.save({"initial": initial, "final": [p.detach() for p in trainer.network.parameters()],
                    "steps": trainer.dp_steps,
                    "sampling_seed": trainer.data_loader.batch_sampler.generator.initial_seed(),
                    "global_seed": torch.initial_seed()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_step_equals_single_process_reference(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for a, b in zip(r0["initial"], r1["initial"]):
        torch.testing.assert_close(a, b)  # rank 0's weights were broadcast
    for a, b in zip(r0["final"], r1["final"]):
        torch.testing.assert_close(a, b)  # the same update on every rank
    # every rank samples from a generator of its own, seeded from the OS: not from the global seed, not shared
    assert r0["sampling_seed"] != r1["sampling_seed"]
    assert {r0["sampling_seed"], r1["sampling_seed"]}.isdisjoint({r0["global_seed"], r1["global_seed"]})
    assert r0["steps"] == r1["steps"] == 1
    # reference: one process, all 7 rows, expected batch size 4 (q N), noise drawn once from the same seed
    from monai_dp.networks import make_private_compatible

    net, _ = make_private_compatible(TinyClassifier())
    with torch.no_grad():
        for p, v in zip(net.parameters(), r0["initial"]):
            p.copy_(v)
    data = make_classification_data(n=40)
    idx = RANK_ROWS[0] + RANK_ROWS[1]
    x = torch.stack([data[i]["image"] for i in idx])
    y = torch.stack([data[i]["label"] for i in idx])
    expected = _reference_update(net, x, y, torch.arange(len(idx)), 4)
    for got, exp in zip(r0["final"], expected):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def _ledger_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from monai.data import DataLoader

        from monai_dp.engines import DPSupervisedTrainer

        net = TinyClassifier()
        trainer = DPSupervisedTrainer(device="cpu", max_epochs=2, train_data_loader=DataLoader(
                                          make_classification_data(n=40), batch_size=4),
                                      network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                      loss_function=torch.nn.CrossEntropyLoss(), noise_multiplier=SIGMA,
                                      max_grad_norm=CLIP, target_delta=1e-3, ledger=f"{out}/ledger.db",
                                      dataset_id="ds")
        trainer.run()
        torch.save({"steps": trainer.dp_steps}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_make_one_ledger_run_and_follow_its_reservation(tmp_path):
    import socket

    from monai_dp.privacy import Mechanism, compose_epsilon
    from monai_dp.privacy.ledger import PrivacyLedger

    budget = compose_epsilon([Mechanism(SIGMA, 0.1, 13)], 1e-3)  # room for 13 of the 20 planned steps
    PrivacyLedger(tmp_path / "ledger.db").init_dataset("ds", epsilon=budget, delta=1e-3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ledger_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    steps = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["steps"] for r in (0, 1)]
    runs = PrivacyLedger(tmp_path / "ledger.db").spent("ds").runs
    assert len(runs) == 1, "one ledger run per job, not per process"
    assert steps == [runs[0]["steps_taken"]] * 2 and 12 <= steps[0] <= 13
