"""The run history stored in run.json: training-loss readings and one record per checkpoint.

run.json must stay strict JSON (the browser's JSON.parse rejects NaN), so non-finite floats are stored as strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .json_floats import float_from_json, float_to_json
from .stats import PreviewStats


@dataclass
class CheckpointRecord:
    """One checkpoint: its training step, its LoRA file (None for the no-LoRA control at step 0) and its health."""

    step: int
    lora_path: str | None
    validation_loss: float | None = None
    preview_stats: PreviewStats | None = None
    likeness: float | None = None
    held_out_loss: float | None = (
        None  # the same fixed-noise loss on images kept out of training (if the user has some)
    )

    def as_dict(self) -> dict:
        return {
            "step": self.step,
            "lora_path": self.lora_path,
            "validation_loss": float_to_json(self.validation_loss),
            "held_out_loss": float_to_json(self.held_out_loss),
            "preview_stats": self.preview_stats.as_dict() if self.preview_stats else None,
            "likeness": float_to_json(self.likeness),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointRecord":
        stats = data.get("preview_stats")
        return cls(
            step=int(data["step"]),
            lora_path=data.get("lora_path"),
            validation_loss=float_from_json(data.get("validation_loss")),
            preview_stats=PreviewStats.from_dict(stats) if stats else None,
            likeness=float_from_json(data.get("likeness")),
            held_out_loss=float_from_json(data.get("held_out_loss")),
        )


@dataclass
class TrainingHistory:
    """Everything the health checks look at, filled by the trainer as it goes and stored in run.json.

    ``loss_steps[i]`` is the training step (optimizer update, 1-based) of the training-loss reading ``losses[i]``.
    The trainer may record every training step or only at log intervals; windows below count readings.
    Non-finite readings are kept (they are a signal). ``likeness_backend`` labels how likeness was scored.
    """

    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    likeness_backend: str | None = None

    def add_training_loss(self, step: int, loss: float) -> None:
        if self.loss_steps and step <= self.loss_steps[-1]:
            raise ValueError(f"training-loss steps must increase: got step {step} after {self.loss_steps[-1]}")
        self.loss_steps.append(int(step))
        self.losses.append(float(loss))

    def add_checkpoint(
        self,
        step: int,
        lora_path: str | None,
        validation_loss: float | None = None,
        preview_stats: PreviewStats | None = None,
        likeness: float | None = None,
        held_out_loss: float | None = None,
    ) -> CheckpointRecord:
        """One record per training step: recording a step again (its health after its file) replaces the record."""
        record = CheckpointRecord(int(step), lora_path, validation_loss, preview_stats, likeness, held_out_loss)
        self.checkpoints = [c for c in self.checkpoints if c.step != record.step]
        self.checkpoints.append(record)
        self.checkpoints.sort(key=lambda c: c.step)
        return record

    def checkpoint_at(self, step: int) -> CheckpointRecord | None:
        for c in self.checkpoints:
            if c.step == step:
                return c
        return None

    @property
    def last_step(self) -> int:
        steps = [self.loss_steps[-1]] if self.loss_steps else []
        steps += [c.step for c in self.checkpoints]
        return max(steps) if steps else 0

    def as_dict(self) -> dict:
        return {
            "loss_steps": list(self.loss_steps),
            "losses": [float_to_json(v) for v in self.losses],
            "checkpoints": [c.as_dict() for c in self.checkpoints],
            "likeness_backend": self.likeness_backend,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingHistory":
        return cls(
            loss_steps=[int(s) for s in data.get("loss_steps", [])],
            losses=[float(float_from_json(v)) for v in data.get("losses", [])],
            checkpoints=[CheckpointRecord.from_dict(c) for c in data.get("checkpoints", [])],
            likeness_backend=data.get("likeness_backend"),
        )
