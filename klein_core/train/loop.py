"""The Klein Base LoRA training loop: one loop you can read top to bottom.

Flow matching as Klein Base is trained: x0 = cached normalised latents, σ ~ a resolution-shifted logit-normal,
xt = (1-σ)·x0 + σ·noise, the transformer predicts ``noise - x0`` (MSE). One **training step** is one optimizer
update over ``grad_accum`` micro-batches of ``batch_size`` images: the only step counter, in names, logs,
progress and checkpoint file names.

σ sampling: u ~ N(0, 1), σ = sigmoid(u) (logit-normal: most samples in the middle of the noise range, where
composition and identity are decided), then the exponential shift σ' = e^μ σ / (1 + (e^μ - 1) σ) with μ rising
linearly from 0.5 at 256 image tokens to 1.15 at 4096 (the scheduler's base/max shift). Larger images keep more
signal at a given σ, so the shift moves them towards more noise, as FLUX training and Klein's sampler do.

The phases: ``preflight`` checks and plans before any model loads; ``TrainingSession`` encodes the data once, loads
the transformer and adds the LoRA; the loop below runs the training steps; the session writes the end of the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..crashpoint import crash_point
from ..data.spec import DatasetSpec
from ..errors import NonFiniteLoss, TrainingInterrupted
from ..model.loading import ResolvedModel
from .config import TrainCallbacks, TrainConfig, TrainedRun
from .distributed import DistributedContext, in_process_group
from .objective import EmptyPromptPreservation, accumulate_gradients, preservation_for
from .preflight import preflight
from .resume import Extension
from .session import Progress, TrainingSession


@in_process_group
def train(
    resolved: ResolvedModel,
    spec: DatasetSpec,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    callbacks: TrainCallbacks | None = None,
    preview_prompts: tuple[str, ...] = (),
    regularization: DatasetSpec | None = None,
    held_out: DatasetSpec | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    allow_changes: bool = False,
    extend: Extension | None = None,
    device: str | None = None,
    dist: DistributedContext | None = None,
) -> TrainedRun:
    """Train a Klein Base LoRA and return the in-memory run. Every file written is atomic.

    ``regularization`` is an optional folder of class images ("photo of a person") mixed into every micro-batch at
    ``config.regularization_weight``; the planner's repeats per image count the identity images only. It is read as
    a regularization set whatever its spec says (``DatasetSpec.as_regularization``: no caption may carry the
    trigger, no dropout). ``held_out`` is an optional folder of images of the same person kept out of training: their
    fixed-noise validation loss is recorded next to the training images' at every checkpoint (the honest measure of
    generalisation) and, without likeness scores, picks the best checkpoint. ``resume`` continues the run in
    ``run_dir``; ``extend`` continues from a checkpoint with more repeats per image (resume.py says how).

    Under torchrun or accelerate (``dist`` None: from their environment) every process trains its slice of the
    global batch and rank 0 alone logs, reports progress and writes files (distributed.py says how the ranks agree).
    """
    callbacks = callbacks or TrainCallbacks()
    log = callbacks.log if dist.is_main else (lambda _msg: None)
    if not dist.is_main:  # rank 0 reports for the group
        callbacks = replace(callbacks, on_step=None, on_progress=None, on_checkpoint=None, log=log)
    run_dir = Path(run_dir)

    checked = preflight(
        resolved,
        spec,
        config,
        run_dir,
        preview_prompts=preview_prompts,
        regularization=regularization,
        held_out=held_out,
        resume=resume,
        allow_changes=allow_changes,
        extend=extend,
        device=device,
        log=log,
        world_size=dist.world_size,
    )
    session = TrainingSession(resolved, checked, run_dir, cache_dir, device, dist, log, callbacks.on_checkpoint)
    progress = session.start()
    start_step = progress.step
    try:
        run_training_steps(session, progress, callbacks)
    except NonFiniteLoss as exc:
        session.explain_non_finite(exc)
        raise
    except BaseException as exc:
        message = session.save_on_stop(progress, start_step)
        log(message)
        if isinstance(exc, TrainingInterrupted):
            raise TrainingInterrupted(message) from None
        raise
    return session.finish(progress.step)


def run_training_steps(session: TrainingSession, progress: Progress, callbacks: TrainCallbacks) -> None:
    """One training step = one optimizer update over G micro-batches; losses are read back every ``log_every``
    training steps (the loop's only host-device sync), at checkpoints and at the end."""
    config, monitor = session.config, session.monitor
    start_step, started = progress.step, time.perf_counter()
    preservation = preservation_for(config.empty_prompt_preservation, session.data.embeds[""], session.transformer)
    session.transformer.train()
    while progress.step < config.training_steps:
        loss = training_step_loss(session, progress.step, callbacks.should_stop, preservation)
        session.optimizer_step()
        progress.step += 1
        progress.pending.append(loss)
        step = progress.step
        crash_point(f"training_step@{step}")
        if callbacks.on_progress:
            callbacks.on_progress(step, config.training_steps)
        is_checkpoint = bool(config.save_every) and step % config.save_every == 0 and step < config.training_steps
        is_log_step = step % config.log_every == 0
        if is_log_step or is_checkpoint or step == config.training_steps:
            seconds_per_step = (time.perf_counter() - started) / (step - start_step)
            read_losses(session, progress, callbacks, seconds_per_step)
        if is_checkpoint:
            session.save_checkpoint(step)
        if config.validation_every and step % config.validation_every == 0 and not is_checkpoint:
            session.record_validation(step)
        collapse = monitor.check() if is_checkpoint or is_log_step else None
        if (
            config.stop_on_collapse
            and (is_checkpoint or is_log_step)
            and session.dist.rank0_decides(collapse is not None, session.device)
        ):
            session.log(f"collapse detected at training step {step}: stopping early (the verdict says where it began)")
            return


def training_step_loss(
    session: TrainingSession, step: int, should_stop, preservation: EmptyPromptPreservation | None = None
) -> torch.Tensor:
    """This rank's gradients of one training step, then their sum over the ranks with the loss and the stop votes
    (distributed.py): a stop asked of any rank after its current micro-batch stops every rank before the update."""
    stop = False
    try:
        micro_batches = session.micro_batches(step)
        loss = accumulate_gradients(
            session.transformer, micro_batches, should_stop, session.config.grad_accum, preservation
        )
    except TrainingInterrupted:
        if not session.dist.is_distributed:
            raise
        loss, stop = torch.zeros((), device=session.device), True  # the vote travels with the step's all-reduce
    params = [p for group in session.optimizer.param_groups for p in group["params"]]
    loss, stop = session.dist.sum_step(params, loss, stop)
    if stop:
        raise TrainingInterrupted("cancelled")
    return loss


def read_losses(
    session: TrainingSession, progress: Progress, callbacks: TrainCallbacks, seconds_per_step: float
) -> None:
    """Read the pending losses back (one sync), record them, stop on a non-finite one, and report progress."""
    values = torch.stack(progress.pending).tolist()
    progress.pending.clear()
    step, total = progress.step, session.config.training_steps
    first_step = step - len(values) + 1
    session.monitor.record_losses(first_step, values)
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(first_step + bad[0])
    if callbacks.on_step:
        callbacks.on_step(
            {
                "training_step": step,
                "training_steps": total,
                "loss": values[-1],
                "losses": [[first_step + i, v] for i, v in enumerate(values)],
                "s_per_step": seconds_per_step,
                "eta_s": seconds_per_step * (total - step),
            }
        )
