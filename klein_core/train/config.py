"""The training configuration and the seams the fronts use: callbacks in, a trained run out.

Defaults are the Klein 9B Base starter values of ``preset.PRESET``; an impossible setting is refused by name when the
config is built, before anything loads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..errors import ConfigError
from ..health.history import CheckpointRecord, TrainingHistory
from ..health.monitor import HealthSummary
from ..model import lora as lora_io
from ..preset import PRESET
from .planner import Plan


BASE_8BIT_NEEDS_CHECKPOINTING = (
    "the 8-bit base needs gradient checkpointing: without it autograd keeps a dequantised bf16 copy of every int8 "
    "block weight for the backward (the fit-check audit counts 16.8 GiB more activations at 9B, 1024 px: "
    "59.5 GiB in all), more than the 8-bit base saves; leave gradient checkpointing on or automatic"
)


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults are the Klein 9B Base starter preset."""

    output_name: str = PRESET.output_name
    training_steps: int | None = None  # None: planned from target_repeats
    target_repeats: float = PRESET.target_repeats
    batch_size: int = PRESET.batch_size
    grad_accum: int = PRESET.grad_accum
    learning_rate: float = PRESET.learning_rate
    warmup_steps: int = 0
    rank: int = PRESET.rank
    alpha: float | None = None  # None: alpha = rank
    seed: int = 0
    save_every: int = PRESET.save_every  # training steps between LoRA checkpoints (0: only the final LoRA)
    keep_last: int = 0  # keep only the newest N step checkpoints (0: keep all)
    gradient_checkpointing: bool | None = None  # None: automatic (on when the GPU needs it; always with base_8bit)
    checkpointed_blocks: int | None = None  # checkpoint K blocks, single-stream first (None: all)
    base_8bit: bool = False  # low-VRAM mode: int8 base weights, LoRA on top (the optional [lowvram] extra)
    compile_blocks: bool = False  # torch.compile each transformer block (worth it on CUDA; the first step compiles)
    log_every: int = 10  # training steps between loss reads: the loop's only host-device sync (checkpoints read too)
    validation_every: int = 0  # extra fixed-noise validation every K training steps (checkpoints always get one)
    stop_on_collapse: bool = False  # stop training as soon as a collapse is detected (the best checkpoint is kept)
    health_previews: bool = True  # render the first preview prompt at each checkpoint for preview stats and likeness
    health_sample_steps: int = PRESET.sample_steps  # sample steps of those health previews (Base needs ~50)
    health_preview_every: int | None = None  # previews at every K-th checkpoint (None: automatic, see estimate)
    health_preview_resolution: int = PRESET.health_preview_resolution  # their largest side (capped by the training's)
    validation_images: int = PRESET.validation_images  # training images in each checkpoint's validation pass
    regularization_weight: float = PRESET.regularization_weight  # loss weight of the optional class-image set
    empty_prompt_preservation: float = 0.0  # weight of keeping the empty prompt's prediction the base's (objective.py)
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        """Refuse an impossible setting by name before anything runs (the planner checks steps, batch and accum)."""
        at_least = {
            "rank": 1,
            "log_every": 1,
            "health_sample_steps": 1,
            "save_every": 0,
            "keep_last": 0,
            "warmup_steps": 0,
            "validation_every": 0,
            "validation_images": 1,
            "health_preview_resolution": 16,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
        numbers = {
            "learning_rate": True,
            "alpha": True,
            "regularization_weight": False,
            "weight_decay": False,
            "empty_prompt_preservation": False,
        }
        for name, positive in numbers.items():  # name -> must be > 0 (else >= 0); alpha None means alpha = rank
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0 or (positive and value == 0)):
                raise ConfigError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        every = self.health_preview_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"health_preview_every must be a whole number >= 1 or None, got {every!r}")
        if self.base_8bit and self.gradient_checkpointing is False:
            raise ConfigError(BASE_8BIT_NEEDS_CHECKPOINTING)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainCallbacks:
    """Hooks the fronts supply: ComfyUI's progress bar and cancel, the CLI's progress line and signals."""

    # at each loss read (every log_every training steps and at checkpoints): {training_step, training_steps, loss,
    # losses: [[training_step, loss], ...] since the previous read, s_per_step, eta_s}
    on_step: Callable[[dict], None] | None = None
    on_progress: Callable[[int, int], None] | None = None  # (training_step, training_steps) after every update
    should_stop: Callable[[], bool] | None = None  # checked every micro-batch; may also raise to cancel
    on_checkpoint: Callable[[CheckpointRecord], None] | None = None  # step, path, validation loss, likeness
    log: Callable[[str], None] = print


class SavedCheckpoint(NamedTuple):
    """A LoRA checkpoint the run kept: its training step, its file and its weights (already in memory for previews)."""

    training_step: int
    path: Path
    weights: lora_io.LoraWeights


@dataclass
class TrainedRun:
    """What training leaves in memory for previews (``KLEIN_LORA_RUN``): no second model load needed."""

    transformer: torch.nn.Module  # plain base transformer (adapter removed, base weights untouched)
    vae: torch.nn.Module
    checkpoints: list[SavedCheckpoint]  # in training-step order
    preview_embeds: dict[str, torch.Tensor]
    trigger: str
    resolution: int
    run_dir: Path
    final_lora: Path
    plan: Plan
    manifest: dict
    history: TrainingHistory  # the typed run history of run.json: loss readings and checkpoint records
    health: HealthSummary | None = None  # collapse verdict, advice and best checkpoint
    regularization: str | None = None  # the class images' share in one line; None without a regularization set
