"""A process's place in the data parallel group, read from the launcher's environment, and the device it trains on
(no CUDA or second process needed: the device choice is plain logic)."""

from __future__ import annotations

import re

import pytest
import torch

from klein_core.errors import KleinError
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


def test_the_launcher_environment_gives_this_process_its_rank_and_the_group_size(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert DistributedContext.from_env() == DistributedContext(rank=3, world_size=4, local_rank=1)


def test_without_a_launcher_environment_the_process_trains_alone(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert DistributedContext.from_env() == DistributedContext(rank=0, world_size=1, local_rank=0)


@pytest.mark.parametrize(
    "environment, named",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
        ({"WORLD_SIZE": "2", "RANK": "1.5"}, "RANK='1.5'"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1'"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": ""}, "LOCAL_RANK=''"),
    ],
)
def test_a_launcher_environment_that_is_no_place_in_the_group_is_refused_naming_the_variable(
    monkeypatch, environment, named
):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(KleinError, match=re.escape(named)):
        DistributedContext.from_env()
