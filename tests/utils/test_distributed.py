"""rank_world: (0, 1) outside a process group, the group's rank and size inside one."""

from __future__ import annotations

import socket

import torch.distributed as dist

from monai_dp.utils.distributed import rank_world


def test_single_process_is_rank_zero_of_one():
    assert not dist.is_initialized()
    assert rank_world() == (0, 1)


def test_inside_a_process_group_it_reports_the_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert rank_world() == (dist.get_rank(), dist.get_world_size()) == (0, 1)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    assert rank_world() == (0, 1)


def test_it_reads_rank_and_size_from_torch_distributed(monkeypatch):
    """A fake initialised group of size 4, rank 3: the helper reads torch.distributed, never assumes."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert rank_world() == (3, 4)
    monkeypatch.setattr(dist, "is_available", lambda: False)
    assert rank_world() == (0, 1)
