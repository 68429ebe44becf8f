"""Everything a user can get wrong is checked before any model loads: the datasets, the plan, the resume state and
the memory mode. ``preflight`` returns those decisions; the training session only carries them out."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..data.captions import substitute_trigger
from ..data.scan import DatasetScan
from ..data.spec import DatasetSpec, fingerprint_parts
from ..errors import DatasetError
from ..model.loading import ResolvedModel
from .config import TrainConfig
from .estimate import CheckpointSettings
from .planner import Plan, plan
from .resume import MANIFEST_FILE as MANIFEST_FILE  # the run folder's file names, re-exported where they were
from .resume import STATE_FILE as STATE_FILE
from .resume import Extension, ResumePoint, find_resume_point, plan_extension, remove_partial_files


@dataclass
class Preflight:
    """The checked inputs of one run: scans of the identity set and the optional regularization and held-out sets,
    the plan (and the config with its planned training steps and memory mode), the dataset fingerprint, where a
    resumed run continues, and the preview prompts with the trigger substituted."""

    spec: DatasetSpec
    scan: DatasetScan
    config: TrainConfig
    plan: Plan
    fingerprint: dict[str, str]
    prompts: tuple[str, ...]
    regularization: DatasetSpec | None = None
    reg_scan: DatasetScan | None = None
    held_out: DatasetSpec | None = None
    held_scan: DatasetScan | None = None
    resume: ResumePoint | None = None
    lineage: dict | None = None  # a run extended from a checkpoint: its parent and what changed
    world_size: int = 1  # processes training data parallel; the plan's B is config.batch_size x world_size

    def datasets(self) -> list[tuple[DatasetScan, DatasetSpec]]:
        """The sets to encode, identity first, then regularization and held-out when present."""
        pairs = ((self.scan, self.spec), (self.reg_scan, self.regularization), (self.held_scan, self.held_out))
        return [(scan, spec) for scan, spec in pairs if scan is not None]


def preflight(
    resolved: ResolvedModel,
    spec: DatasetSpec,
    config: TrainConfig,
    run_dir: Path,
    *,
    preview_prompts: tuple[str, ...],
    regularization: DatasetSpec | None,
    held_out: DatasetSpec | None,
    resume: bool,
    allow_changes: bool,
    extend: Extension | None = None,
    device,
    log: Callable[[str], None],
    world_size: int = 1,  # processes of a data-parallel run: B is the global batch, config.batch_size x world_size
) -> Preflight:
    """Scan, plan and check; log the plan, the warnings and the memory estimate. Raises before any model loads."""
    if spec.trigger_policy == "exclude":
        raise DatasetError(
            f"{spec.folder}: trigger_policy 'exclude' is for a regularization set of class images; "
            "the identity dataset needs 'prepend', 'append' or 'keep'"
        )
    scan = spec.scan()
    if regularization is not None:
        regularization = regularization.as_regularization(scan.trigger)
    reg_scan = regularization.scan() if regularization is not None else None
    held_scan = held_out.scan() if held_out is not None else None
    fingerprint = fingerprint_parts(scan, spec)
    resume_point = lineage = None
    if extend is not None:  # the total is the parent's training step plus the extra dose
        resume_point, lineage = plan_extension(extend, config, len(scan.items), fingerprint, log, world_size)
        config = replace(config, training_steps=lineage["training_steps"])
    global_batch = config.batch_size * world_size
    the_plan = plan(len(scan.items), config.target_repeats, global_batch, config.grad_accum, config.training_steps)
    config = replace(config, training_steps=the_plan.training_steps)
    if resume and extend is None:
        for leftover in remove_partial_files(run_dir):
            log(f"removed {leftover.name}: a write cut off by a kill")
        resume_point = find_resume_point(run_dir, config, fingerprint, allow_changes, log, world_size)
    _log_plan(the_plan, config, scan, reg_scan, held_scan, log, world_size)
    if config.base_8bit:
        from ..model.lowvram import choose_backend

        choose_backend()  # a missing optional backend fails here, before any model loads
    config = _estimate_memory_mode(resolved, spec, scan, config, device, log)
    prompts = tuple(dict.fromkeys(substitute_trigger(p, scan.trigger) for p in preview_prompts))
    return Preflight(
        spec,
        scan,
        config,
        the_plan,
        fingerprint,
        prompts,
        regularization,
        reg_scan,
        held_out,
        held_scan,
        resume_point,
        lineage,
        world_size,
    )


def _log_plan(
    the_plan: Plan,
    config: TrainConfig,
    scan: DatasetScan,
    reg_scan: DatasetScan | None,
    held_scan: DatasetScan | None,
    log: Callable[[str], None],
    world_size: int = 1,
) -> None:
    """What the user checks before any model loads: the dataset's warnings, the plan (with several processes, how
    the global batch B is made), the regularization and held-out sets."""
    for warning in scan.warnings:
        log(f"warning: {warning}")
    split = f" ({config.batch_size} per process x {world_size} processes)" if world_size > 1 else ""
    log(
        f"plan: N={the_plan.images} images, B={the_plan.batch_size}{split}, G={the_plan.grad_accum}, "
        f"S={the_plan.training_steps} training steps, "
        f"{the_plan.repeats_per_image:.1f} repeats per image ({the_plan.band})"
    )
    if reg_scan is not None:
        log(
            regularization_summary(
                len(reg_scan.items),
                config.regularization_weight,
                regularization_repeats(the_plan, config, len(reg_scan.items)),
            )
        )
    if held_scan is not None:
        log(
            f"held out: {len(held_scan.items)} images, never trained on; "
            "their validation loss is recorded per checkpoint"
        )
        for warning in _held_out_overlap(scan, held_scan):
            log(f"warning: {warning}")


def regularization_summary(images: int, weight: float, repeats_per_image: float) -> str:
    """One line for the log and the node summary: the class images' share, shown apart from the identity dose."""
    return (
        f"regularization: {images} class images at weight {weight:g} "
        f"({repeats_per_image:.1f} repeats each; not counted in the identity dose)"
    )


def regularization_repeats(the_plan: Plan, config: TrainConfig, images: int) -> float:
    """How often each class image is seen: one regularization micro-batch rides along with every identity one
    (``the_plan.batch_size`` is the global batch)."""
    return the_plan.training_steps * the_plan.batch_size * config.grad_accum / images


def _held_out_overlap(scan: DatasetScan, held_scan: DatasetScan) -> list[str]:
    """Held-out images that are byte-identical to a training image are not held out at all: say which."""
    trained = {item.sha256: item.name for item in scan.items}
    return [
        f"held-out image {item.name} is the same file as training image {trained[item.sha256]}: its loss is not "
        "held out"
        for item in held_scan.items
        if item.sha256 in trained
    ]


def _estimate_memory_mode(
    resolved: ResolvedModel, spec: DatasetSpec, scan: DatasetScan, config: TrainConfig, device, log
) -> TrainConfig:
    """Log the VRAM/time estimate before step 1; decide what to checkpoint (automatic when ``None``) and at which
    checkpoints the health preview renders (automatic when ``None``: every one, unless that costs more than a tenth
    of the training). Returns the config with both decisions."""
    from .memory_mode import decide_memory_mode
    from .gpu import detect_gpu_memory, detect_gpu_name

    decision = decide_memory_mode(
        resolved.transformer_config,
        max(spec.resolutions),
        config.rank,
        config.gradient_checkpointing,
        config.base_8bit,
        gpu_memory_gib=detect_gpu_memory() if str(device).startswith("cuda") else None,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        images=len(scan.items),
        resolutions=len(spec.resolutions),
        training_steps=config.training_steps or 0,
        device_name=detect_gpu_name(),
        checkpoints=CheckpointSettings.of(config),
        empty_prompt_preservation=config.empty_prompt_preservation > 0,
    )
    for line in decision.lines:
        log(line)
    work = decision.estimate.checkpoint
    return replace(
        config,
        gradient_checkpointing=decision.mode.gradient_checkpointing,
        checkpointed_blocks=decision.mode.checkpointed_blocks,
        health_preview_every=work.health_preview_every if work is not None else 1,
    )
