"""How fast the tiny Klein's pre-training steps run data parallel on 2 cores, and what keeping freed memory buys.

    python bench/pretrain_steps.py [--json] [--steps N] [--rounds R]

``klein-lora make-tiny --pretrained`` trains the VAE (batch 8) and the transformer (batch 32) on two single-threaded
processes, each fitting half of every batch, with torch's ``DistributedDataParallel`` over gloo. Each setting below
runs both ranks in fresh processes (glibc's malloc settings are per process) and reports the mean milliseconds and
page faults of a training step, the pack's own step (``vae_loss``/``flow_matching_loss``,
``optimizer_step``):

* ``alone``: each rank steps on its half with no all-reduce (the floor any data-parallel step pays);
* ``ddp``: the pack's ``data_parallel`` (DDP, its default gradient buckets) with glibc's default malloc;
* ``ddp_kept``: the same after ``keep_freed_memory`` (glibc keeps freed activations for the next step), what
  ``make-tiny --pretrained`` runs.

The settings run in turn, ``rounds`` times (so a load change on shared cores hits all of them), and each figure is
the median of its rounds. Ratios: ``ddp_kept / ddp`` (goal < 1: keeping freed memory pays for itself) and
``ddp_kept / alone`` (what the all-reduce costs). Figures go in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - puts the repository on the path
import torch
import torch.multiprocessing as mp

SETTINGS = ("alone", "ddp", "ddp_kept")
MODELS = {"vae": 8, "transformer": 32}  # the shipped budget's batch sizes (PretrainBudget)
MAX_GRAD_NORM = {"vae": None, "transformer": 1.0}  # as fit_vae and fit_transformer clip


def _model_and_step(name: str, half_batch: int):
    """The module to wrap and a function of it that runs one training loss on random inputs of half a batch."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from klein_core.tools.pretrain import (
        PRETRAINED_TRANSFORMER_CONFIG,
        PRETRAINED_VAE_CONFIG,
        ThroughLatentMode,
        vae_loss,
    )
    from klein_core.train.objective import flow_matching_loss

    if name == "vae":
        pictures = torch.rand(half_batch, 3, 64, 64) * 2 - 1
        vae = ThroughLatentMode(AutoencoderKLFlux2(**PRETRAINED_VAE_CONFIG))
        return vae, lambda model: vae_loss(model, pictures)
    latents, embeds = torch.randn(half_batch, 128, 4, 4), torch.randn(half_batch, 32, 48)
    noise, sigma = torch.randn(half_batch, 128, 4, 4), torch.rand(half_batch)
    transformer = Flux2Transformer2DModel(**PRETRAINED_TRANSFORMER_CONFIG)
    return transformer, lambda model: flow_matching_loss(model, latents, embeds, noise, sigma)


def _time_steps(name: str, setting: str, dist, steps: int) -> tuple[float, float]:
    """Milliseconds and page faults per training step of ``name`` on this rank's half of the batch."""
    from klein_core.tools.pretrain import data_parallel, optimizer_step

    torch.manual_seed(0)
    module, loss_of = _model_and_step(name, MODELS[name] // 2)
    params = list(module.parameters())
    model = module if setting == "alone" else data_parallel(module, dist)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for _ in range(3):  # warm-up (DDP rebuilds its buckets after the first step)
        optimizer_step(params, optimizer, loss_of(model), max_grad_norm=MAX_GRAD_NORM[name])
    faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        optimizer_step(params, optimizer, loss_of(model), max_grad_norm=MAX_GRAD_NORM[name])
    seconds, faults = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds / steps * 1000, faults / steps


def _rank(rank: int, init_method: str, setting: str, steps: int, results) -> None:
    from klein_core.tools.pretrain import keep_freed_memory
    from klein_core.train.distributed import DistributedContext, process_group

    torch.set_num_threads(1)
    if setting == "ddp_kept":
        keep_freed_memory()
    dist = DistributedContext(rank, 2)
    with process_group(dist, "cpu", init_method) if setting != "alone" else contextlib.nullcontext():
        for name in MODELS:
            ms, faults = _time_steps(name, setting, dist, steps)
            if rank == 0:
                results[name], results[f"{name} faults"] = ms, faults


def measure(setting: str, steps: int) -> dict:
    """Milliseconds and page faults (rank 0's) per training step of each model on two ranks in fresh processes."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as meeting, context.Manager() as manager:
        results = manager.dict()
        init_method = (Path(meeting) / "rendezvous").as_uri()
        ranks = [context.Process(target=_rank, args=(r, init_method, setting, steps, results)) for r in range(2)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join()
        if any(process.exitcode for process in ranks):
            raise SystemExit(f"a rank failed in setting {setting}")
        return {name: round(figure, 1) for name, figure in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per model, setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="times each setting runs, in turn with the others")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error(f"--steps and --rounds must be 1 or more, got {args.steps} and {args.rounds}")
    rounds = [{setting: measure(setting, args.steps) for setting in SETTINGS} for _ in range(args.rounds)]
    figures = [*MODELS, *(f"{name} faults" for name in MODELS)]
    medians = {setting: {k: statistics.median(r[setting][k] for r in rounds) for k in figures} for setting in SETTINGS}
    ratios = {
        name: {
            "ddp_kept / ddp": round(medians["ddp_kept"][name] / medians["ddp"][name], 3),
            "ddp_kept / alone": round(medians["ddp_kept"][name] / medians["alone"][name], 3),
        }
        for name in MODELS
    }
    report = {"ms_and_page_faults_per_training_step": medians, "ratios": ratios, "steps": args.steps, "rounds": rounds}
    report.update(_common.versions())
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name in MODELS:
        times = ", ".join(
            f"{s} {medians[s][name]} ms ({medians[s][name + ' faults']:.0f} page faults)" for s in SETTINGS
        )
        print(f"{name} (batch {MODELS[name]}, half per rank), per training step: {times}")
        print("  " + ", ".join(f"{label} {value}" for label, value in ratios[name].items()))


if __name__ == "__main__":
    main()
