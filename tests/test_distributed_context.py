"""A process's place in the data parallel group, read from the launcher's environment, and the device it trains on
(no CUDA or second process needed: the device choice is plain logic)."""

from __future__ import annotations

import pytest
import torch

from klein_core.train.distributed import DistributedContext, process_group, rank_device


def test_each_rank_of_a_cuda_run_trains_on_the_gpu_of_its_local_rank():
    assert rank_device(DistributedContext(rank=3, world_size=4, local_rank=1), "cuda") == "cuda:1"
    assert rank_device(DistributedContext(rank=0, world_size=2, local_rank=0), "cuda:0") == "cuda:0"


def test_one_process_and_cpu_ranks_keep_the_device_they_were_given():
    assert rank_device(DistributedContext(), "cuda") == "cuda"
    assert rank_device(DistributedContext(rank=1, world_size=2, local_rank=1), "cpu") == "cpu"


def test_a_rank_joining_a_group_the_launcher_already_made_still_gets_its_own_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined"))
    with process_group(DistributedContext(rank=1, world_size=2, local_rank=1), "cuda") as device:
        assert device == "cuda:1"
    assert chosen == ["cuda:1"]
