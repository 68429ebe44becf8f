"""Data parallel training on ``torch.distributed``: ``torchrun --nproc-per-node N -m klein_core train ...`` or
``accelerate launch -m klein_core train ...`` train one LoRA on N processes (NCCL on CUDA, gloo on CPU).

Why an all-reduce of the LoRA gradients and not torch's DistributedDataParallel around the transformer:

- exactness: a global batch whose last bucket batch is short gives some ranks fewer samples, or none. Each rank
  scales its loss by its share of the global micro-batch and the gradients are *summed*, so N processes compute the
  gradient of one process with the global batch. DDP averages by the world size, and a rank with nothing to forward
  would never reach its gradient hooks (a hang);
- one collective per training step: the G micro-batches accumulate locally, then the flat LoRA gradients, the loss
  and every rank's stop vote travel in a single all-reduce. DDP would sync at each micro-batch (or need ``no_sync``
  around all but the last) and knows nothing of the loss or the stop;
- the adapted transformer stays a plain module: block checkpointing, the 8-bit base, ``compile`` per block and the
  LoRA's parameter names are untouched (DDP wants ``static_graph`` with checkpointing and wraps the module's names).
The LoRA is a few million parameters: without DDP's overlap of the all-reduce with the backward the cost is one
small transfer per training step.

Decisions are taken once: the summed loss is the same number on every rank, so the non-finite stop happens at the
same training step everywhere; rank 0 alone does the checkpoint health work (validation, previews, the collapse
verdict, the best checkpoint) and broadcasts what the others must follow; a stop (SIGTERM, SIGINT) asked of any rank
is a vote in the step's all-reduce, so every rank stops after the same training step and rank 0 saves it once.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence

import torch

from ..errors import KleinError
from ..model.loading import default_device

# Long enough for rank 0 to fill the latent/text cache (the text encoder loads once) while the others wait at the
# barrier; a rank that dies is noticed at once by gloo, and by torchrun, which stops the other processes.
GROUP_TIMEOUT = timedelta(minutes=30)


class DistributedError(KleinError):
    """Another process of the training group failed or left: this one stops too (its peer's error says why)."""


@dataclass
class DistributedContext:
    """This process's place in the group: rank 0 writes every file and logs; every rank computes its slice."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistributedContext":
        """What torchrun and accelerate set: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (absent: one process). A value
        that is no place in the group is refused before any model loads, naming the variable."""
        world_size = _whole_env_number("WORLD_SIZE", 1, low=1)
        rank = _whole_env_number("RANK", 0, low=0)
        if rank >= world_size:
            raise KleinError(f"RANK={rank} is not a rank of a group of WORLD_SIZE={world_size} (0 to {world_size - 1})")
        return cls(rank, world_size, _whole_env_number("LOCAL_RANK", 0, low=0))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def batch_slice(self, per_process: int) -> slice:
        """This rank's positions in a global micro-batch of ``per_process`` x world size samples."""
        return slice(self.rank * per_process, (self.rank + 1) * per_process)

    def sum_step(
        self, params: Sequence[torch.nn.Parameter], loss: torch.Tensor, stop: bool
    ) -> tuple[torch.Tensor, bool]:
        """Sum every LoRA gradient, the loss and the stop votes over the ranks in one all-reduce (in float32) and
        return the global loss and whether any rank asked to stop. One process: both unchanged."""
        if not self.is_distributed:
            return loss, stop
        parts = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in parts] + [loss.reshape(1).float(), loss.new_full((1,), stop)])
        self._collective(torch.distributed.all_reduce, flat)
        offset = 0
        for param in params:
            param.grad = flat[offset : offset + param.numel()].view_as(param).to(param.dtype)
            offset += param.numel()
        return flat[-2].to(loss.dtype), bool(flat[-1].item() > 0)

    def rank0_decides(self, decision: bool, device) -> bool:
        """Rank 0's ``decision`` on every rank (the collapse verdict lives on rank 0)."""
        if not self.is_distributed:
            return decision
        flag = torch.tensor([float(decision)], device=device)
        self._collective(torch.distributed.broadcast, flag, src=0)
        return bool(flag.item() > 0)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (a whole batch's loss from each rank's share). One process: itself."""
        total = value.detach().float().reshape(1).clone()
        if self.is_distributed:
            self._collective(torch.distributed.all_reduce, total)
        return float(total) / self.world_size

    def barrier(self) -> None:
        if self.is_distributed:
            self._collective(torch.distributed.barrier)

    def _collective(self, operation, *args, **kwargs) -> None:
        """A collective that fails because a peer died becomes a clear error on this rank."""
        try:
            operation(*args, **kwargs)
        except RuntimeError as exc:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: another training process failed or left, so this one stops "
                f"too (the failing rank's own error is printed above it): {exc}"
            ) from None


def _whole_env_number(name: str, absent: int, low: int) -> int:
    """The launcher's environment variable ``name`` as a whole number >= ``low`` (``absent`` when it is not set)."""
    text = os.environ.get(name)
    if text is None:
        return absent
    try:
        if int(text) >= low:
            return int(text)
    except ValueError:
        pass
    raise KleinError(f"environment variable {name}={text!r} must be a whole number >= {low} (torchrun sets it)")


def rank_device(dist: DistributedContext, device: str) -> str:
    """This rank's own device: ``cuda:LOCAL_RANK`` for a CUDA run of several processes (each process its own GPU,
    also when the launcher already made the group), else ``device`` unchanged (the CPU, or one process)."""
    if dist.is_distributed and torch.device(device).type == "cuda":
        return f"cuda:{dist.local_rank}"
    return device


@contextmanager
def process_group(dist: DistributedContext, device: str, init_method: str | None = None) -> Iterator[str]:
    """Join the launcher's process group (NCCL on CUDA, gloo on the CPU) for the run and yield this rank's device
    (:func:`rank_device`), also when the group already exists. One process: nothing to join, the device unchanged.
    ``init_method`` is where the ranks meet (None: the launcher's ``MASTER_ADDR``/``MASTER_PORT``; the pack's own
    processes use a ``file://`` path).

    The group is left on a normal end and on stops every rank agreed on; after a peer's failure it is not (tearing
    down a broken NCCL communicator can block) and the process exit releases it."""
    device = rank_device(dist, device)
    cuda = torch.device(device).type == "cuda"
    if dist.is_distributed and cuda:
        torch.cuda.set_device(device)
    if not dist.is_distributed or torch.distributed.is_initialized():
        yield device
        return
    torch.distributed.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=init_method,
        rank=dist.rank,
        world_size=dist.world_size,
        timeout=GROUP_TIMEOUT,
    )
    agreed = False
    try:
        yield device
        agreed = True
    except KleinError as exc:
        agreed = not isinstance(exc, DistributedError)
        raise
    finally:
        if agreed:
            torch.distributed.destroy_process_group()


def in_process_group(train):
    """``train(..., dist=None, device=None)`` run inside :func:`process_group`: ``dist`` from the launcher's
    environment when not given, ``device`` this rank's."""

    @functools.wraps(train)
    def run(*args, dist: DistributedContext | None = None, device: str | None = None, **kwargs):
        dist = dist or DistributedContext.from_env()
        with process_group(dist, device or default_device()) as rank_device:
            return train(*args, dist=dist, device=rank_device, **kwargs)

    return run
