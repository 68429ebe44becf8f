"""Where ``--resume`` picks a run up, decided before any model loads.

The session writes the resume state first at every checkpoint, then the LoRA file, then run.json, and only then
does the checkpoint's health work; every write is atomic. So after a kill at any moment the run folder holds one of:

- a state at least as new as the newest checkpoint file: the adapter, optimizer, scheduler and RNG continue exactly
  (the resumed run equals an unbroken one); a checkpoint file or health record the kill cut off is redone;
- no state, or one older than the newest checkpoint file (a run from before this order, or a state deleted by hand):
  the newest checkpoint's LoRA continues with a fresh optimizer and a short LR warmup, and the log says so;
- nothing saved yet but run.json: the run starts again from training step 0 (the same run, it is deterministic).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from ..data.spec import DatasetSpec, changed_fingerprint_parts
from ..errors import ResumeError
from ..health.history import TrainingHistory
from ..model import lora as lora_io
from ..model.loading import ResolvedModel, resolve_model
from ..preset import PRESET
from .config import TrainConfig
from .planner import training_steps_for

STATE_FILE = "training_state.pt"
MANIFEST_FILE = "run.json"
# Settings whose change a resume names (and refuses without --allow-changes); the rank is refused always.
# The batch is compared as the global batch (batch_size x world size): 2 processes x 1 resume as 1 process x 2.
COMPARED_SETTINGS = (
    "grad_accum",
    "learning_rate",
    "rank",
    "alpha",
    "seed",
    "warmup_steps",
    "training_steps",
)
STEP_CHECKPOINT = re.compile(r"_step(\d+)\.safetensors$")  # <name>_stepNNNNNN.safetensors


@dataclass
class ResumePoint:
    """What a resumed run restores. ``state`` is the full resume state (optimizer, scheduler, RNG) or None when the
    LoRA continues from a checkpoint file with a fresh optimizer warmed up over ``warmup_steps`` training steps."""

    step: int
    source: Path
    history: dict
    lora: lora_io.LoraWeights | None = None
    state: dict | None = None
    warmup_steps: int = 0

    @property
    def kind(self) -> str:
        return "state" if self.state is not None else ("checkpoint" if self.lora is not None else "start")

    def as_dict(self) -> dict:
        """The manifest's record of this resume."""
        return {
            "kind": self.kind,
            "training_step": self.step,
            "source": str(self.source),
            "fresh_optimizer_warmup_steps": self.warmup_steps if self.kind == "checkpoint" else None,
        }


def find_resume_point(
    run_dir: Path,
    config: TrainConfig,
    fingerprint: dict[str, str],
    allow_changes: bool,
    log: Callable[[str], None],
    world_size: int = 1,
) -> ResumePoint:
    """The newest exact point to continue from (see the module docstring); refuses changed settings by name."""
    state = torch.load(run_dir / STATE_FILE, weights_only=False) if (run_dir / STATE_FILE).exists() else None
    manifest = read_manifest(run_dir)
    newest = newest_checkpoint(run_dir, config.output_name)
    if state is None and manifest is None:
        raise ResumeError(f"nothing to resume in {run_dir}: no {STATE_FILE} and no {MANIFEST_FILE}")
    saved = state if state is not None else manifest
    old = (saved["config"], state["fingerprint"] if state is not None else manifest["dataset"]["fingerprint"])
    changed = _changes(*old, config, fingerprint, launch=(saved.get("world_size", 1), world_size))
    if changed and not allow_changes:
        raise ResumeError(
            f"cannot resume: {', '.join(changed)} changed since the run started; restore them, start a new run, "
            "or override with --allow-changes"
        )
    if state is not None and (newest is None or state["training_step"] >= newest[0]):
        return ResumePoint(
            state["training_step"], run_dir / STATE_FILE, _newest_history(state, manifest), state["lora"], state
        )
    history = manifest["history"] if manifest is not None else state["manifest"]["history"]
    if newest is None:
        log(f"nothing saved yet in {run_dir} (no checkpoint, no {STATE_FILE}): starting from training step 0")
        return ResumePoint(0, run_dir / MANIFEST_FILE, TrainingHistory().as_dict())
    step, path = newest
    warmup = max(1, min(PRESET.fresh_optimizer_warmup_steps, config.training_steps - step))
    why = (
        f"no {STATE_FILE}"
        if state is None
        else f"{STATE_FILE} is at training step {state['training_step']}, older than the newest checkpoint"
    )
    log(
        f"{why}: continuing from {path.name} (training step {step}) with a fresh optimizer and a {warmup}-step LR "
        "warmup (the run will differ slightly from an unbroken one)"
    )
    return ResumePoint(step, path, _history_until(history, step), lora_io.read_lora_file(path), None, warmup)


@dataclass
class RunInputs:
    """What a run trains on and with: the front's arguments to ``train``."""

    resolved: ResolvedModel
    spec: DatasetSpec
    config: TrainConfig
    regularization: DatasetSpec | None
    held_out: DatasetSpec | None
    preview_prompts: tuple[str, ...]
    cache_dir: str | None


def inputs_from_manifest(run_dir: Path, cache_dir: str | None = None) -> RunInputs:
    """What ``klein-lora train --resume RUN`` alone continues with: the model, datasets, settings and preview prompts
    recorded in run.json, each checked before any model loads."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise ResumeError(f"nothing to resume in {run_dir}: no {MANIFEST_FILE}")
    source = manifest["model"].get("source")
    if source is None:
        raise ResumeError(
            f"{run_dir / MANIFEST_FILE} does not record its model files (an older run): resume it with "
            "the full command and --resume"
        )
    spec = _spec_from_dict(manifest["dataset"])
    spec.scan()  # dataset errors before any model work
    extra = [
        _spec_from_dict(manifest[key]["spec"]) if manifest.get(key) else None for key in ("regularization", "held_out")
    ]
    for extra_spec in extra:
        if extra_spec is not None:
            extra_spec.scan()
    return RunInputs(
        resolve_model(**source),
        spec,
        TrainConfig(**manifest["config"]),
        *extra,
        tuple(manifest.get("preview_prompts", ())),
        cache_dir or manifest.get("cache_dir"),
    )


def _spec_from_dict(saved: dict) -> DatasetSpec:
    names = {f.name for f in fields(DatasetSpec)}
    return DatasetSpec(**{key: value for key, value in saved.items() if key in names})


@dataclass(frozen=True)
class Extension:
    """Continue from a checkpoint file (of this run folder or another) with ``extra_repeats`` more repeats per image."""

    checkpoint: Path
    extra_repeats: float


def plan_extension(
    extension: Extension,
    config: TrainConfig,
    images: int,
    fingerprint: dict[str, str],
    log: Callable[[str], None],
    world_size: int = 1,
) -> tuple[ResumePoint, dict]:
    """Where an extended run starts and its lineage. The extra training steps follow the dose formula
    ceil(N·R/(B·G)); checkpoints are named by the cumulative training step. From the step of its run's newest
    state the optimizer, scheduler and RNG continue exactly; from an earlier checkpoint a fresh optimizer warms up."""
    file = Path(extension.checkpoint)
    parent = read_manifest(file.parent) if file.is_file() else None
    if parent is None:
        raise ResumeError(
            f"cannot continue from {file}: "
            + (
                "no such file"
                if not file.is_file()
                else f"no {MANIFEST_FILE} beside it, so the run it belongs to is unknown"
            )
        )
    found = STEP_CHECKPOINT.search(file.name)
    if found is None:
        raise ResumeError(f"cannot continue from {file}: not a step checkpoint (<name>_stepNNNNNN.safetensors)")
    step = int(found.group(1))
    launch = (parent.get("world_size", 1), world_size)
    changed = _changes(
        parent["config"], parent["dataset"]["fingerprint"], config, fingerprint, ("training_steps",), launch
    )
    global_batch = config.batch_size * world_size
    extra = training_steps_for(images, extension.extra_repeats, global_batch, config.grad_accum)
    state_path = file.parent / STATE_FILE
    state = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if state is not None and state["training_step"] == step:
        point = ResumePoint(
            step, state_path, _history_until(_newest_history(state, parent), step), state["lora"], state
        )
    else:
        warmup = max(1, min(PRESET.fresh_optimizer_warmup_steps, extra))
        point = ResumePoint(
            step, file, _history_until(parent["history"], step), lora_io.read_lora_file(file), None, warmup
        )
    log(
        f"extending {file.name} (training step {step}) by {extension.extra_repeats:g} repeats per image: "
        f"ceil(N·R/(B·G)) = ceil({images}·{extension.extra_repeats:g}/({global_batch}·{config.grad_accum})) = "
        f"{extra} more training steps, {step + extra} in all" + (", changed: " + ", ".join(changed) if changed else "")
    )
    lineage = {
        "parent_run": str(file.parent.resolve()),
        "parent_step": step,
        "parent_checkpoint": str(file.resolve()),
        "extra_repeats_per_image": extension.extra_repeats,
        "extra_training_steps": extra,
        "training_steps": step + extra,
        "changed": changed,
        "continued_with": point.kind,
    }
    return point, lineage


def step_checkpoints(runs_root: Path) -> list[str]:
    """The step checkpoints a run can continue from (each with its run's run.json beside it) in the run folders
    under ``runs_root``, as ``<run folder>/<file>``, by run and training step: a "continue from" list."""
    if not runs_root.is_dir():
        return []
    return sorted(
        f"{path.parent.name}/{path.name}"
        for path in runs_root.glob("*/*_step*.safetensors")
        if STEP_CHECKPOINT.search(path.name) and (path.parent / MANIFEST_FILE).is_file()
    )


def continuation_summary(manifest: dict) -> str | None:
    """Which continuation an extended run made, in words: from the checkpoint at its run's newest state the
    optimizer, scheduler and RNG continued exactly; from an earlier one a fresh optimizer warmed up. None for a run
    that is no continuation."""
    lineage, resumed = manifest.get("lineage"), manifest.get("resumed_from")
    if not lineage or not resumed:
        return None
    start = (
        f"continued from {Path(lineage['parent_checkpoint']).name} (training step {lineage['parent_step']}) with "
        f"{lineage['extra_repeats_per_image']:g} more repeats per image ({lineage['extra_training_steps']} more "
        "training steps): "
    )
    if resumed["kind"] == "state":
        how = "exact optimizer continuation from the run's newest state (optimizer, scheduler and RNG)"
    else:
        how = (
            f"fresh optimizer with a {resumed['fresh_optimizer_warmup_steps']}-step LR warmup (no optimizer state "
            "is kept for an earlier checkpoint)"
        )
    changed = f"; changed: {', '.join(lineage['changed'])}" if lineage["changed"] else ""
    return start + how + changed


def read_manifest(run_dir: Path) -> dict | None:
    path = run_dir / MANIFEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def newest_checkpoint(run_dir: Path, output_name: str) -> tuple[int, Path] | None:
    """(training step, file) of the highest-step ``<name>_stepNNNNNN.safetensors`` in the run folder."""
    pattern = re.compile(rf"{re.escape(output_name)}_step(\d+)\.safetensors")
    found = [
        (int(m.group(1)), p)
        for p in run_dir.glob(f"{output_name}_step*.safetensors")
        if (m := pattern.fullmatch(p.name))
    ]
    return max(found) if found else None


def remove_partial_files(run_dir: Path) -> list[Path]:
    """Temporary files of writes a kill cut off (never renamed onto their target, so never read): removed."""
    from ..atomic import PARTIAL_SUFFIX

    leftovers = sorted(run_dir.glob(f".*{PARTIAL_SUFFIX}"))
    for path in leftovers:
        path.unlink()
    return leftovers


def _changes(
    old_config: dict,
    old_fingerprint: dict,
    config: TrainConfig,
    fingerprint: dict[str, str],
    expected: tuple[str, ...] = (),
    launch: tuple[int, int] = (1, 1),
) -> list[str]:
    """What changed since the run started, by name; the rank never may (the LoRA's matrices have its shape).
    ``launch`` is (the run's world size, today's): the global batch must stay, however it is split."""
    if old_config.get("rank") != config.rank:
        raise ResumeError(
            f"cannot resume: rank ({old_config.get('rank')} -> {config.rank}) changed; a LoRA keeps its "
            "rank: start a new run for another one"
        )
    changed = changed_fingerprint_parts(old_fingerprint, fingerprint)
    (old_world, world), old_batch = launch, old_config.get("batch_size")
    if old_batch * old_world != config.batch_size * world:
        changed.append(
            f"global batch size ({old_batch}x{old_world} -> {config.batch_size}x{world} processes: "
            f"{old_batch * old_world} -> {config.batch_size * world}; --batch-size is per process)"
        )
    return changed + [
        f"{key} ({old_config.get(key)} -> {getattr(config, key)})"
        for key in COMPARED_SETTINGS
        if key not in expected and old_config.get(key) != getattr(config, key)
    ]


def _newest_history(state: dict, manifest: dict | None) -> dict:
    """run.json is written after the state and again after the health work: when it reached the state's training
    step it holds that checkpoint's health too; otherwise the state's own history is the newest."""
    saved = state["manifest"]["history"]
    if manifest is None:
        return saved
    on_disk = TrainingHistory.from_dict(manifest["history"])
    if on_disk.last_step == state["training_step"] and on_disk.checkpoint_at(state["training_step"]) is not None:
        return manifest["history"]
    return saved


def _history_until(history: dict, step: int) -> dict:
    """The history up to and including ``step``: what came after it is not part of the continued run."""
    kept = TrainingHistory.from_dict(history)
    pairs = [(s, v) for s, v in zip(kept.loss_steps, kept.losses) if s <= step]
    kept.loss_steps, kept.losses = [s for s, _ in pairs], [v for _, v in pairs]
    kept.checkpoints = [c for c in kept.checkpoints if c.step <= step]
    return kept.as_dict()
