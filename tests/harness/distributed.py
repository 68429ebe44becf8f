"""Runs INSIDE each process of the gloo group that tests/test_distributed.py starts with torch.multiprocessing: the
environment torchrun would set, then ``klein_core.train.loop.train`` as the CLI calls it. What the rank ended with
(no error, or the error's class and message) is written to ``<out>/rank<N>.json`` for the test to judge.

A job may make one rank's loss non-finite from its k-th micro-batch on (``nan_on_rank``, ``nan_from_micro_batch``),
or ask every rank to stop after k micro-batches (``stop_after_micro_batches``), as a signal handler would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def train_rank(rank: int, world_size: int, port: int, job: dict, out: str) -> None:
    import torch

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1: the ranks share the cores
    from klein_core.data.spec import DatasetSpec
    from klein_core.errors import KleinError
    from klein_core.model.loading import resolve_model
    from klein_core.train import objective
    from klein_core.train.config import TrainCallbacks, TrainConfig
    from klein_core.train.loop import train

    if job.get("nan_on_rank") == rank:
        _poison_loss(objective, job["nan_from_micro_batch"])
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > job.get("stop_after_micro_batches", float("inf"))

    try:
        train(
            resolve_model(job["model"]),
            DatasetSpec(**job["spec"]),
            TrainConfig(**job["config"]),
            job["run_dir"],
            callbacks=TrainCallbacks(should_stop=should_stop, log=lambda _m: None),
            cache_dir=job["cache_dir"],
        )
        outcome = {"error": None, "message": ""}
    except KleinError as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))


def _poison_loss(objective, from_call: int) -> None:
    """This rank's flow-matching loss (and so its gradients) becomes NaN from its ``from_call``-th micro-batch on."""
    real = objective.flow_matching_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= from_call else loss

    objective.flow_matching_loss = poisoned
