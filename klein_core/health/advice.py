"""What to do about it: the ordered collapse advice of the Klein 9B character guide, the weak-LoRA diagnosis and the
choice of the best checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..preset import PRESET
from .collapse import CollapseReport
from .history import CheckpointRecord, TrainingHistory
from .json_floats import is_finite

# --------------------------------------------------------------------------------------------------------------------
# Advice
# --------------------------------------------------------------------------------------------------------------------


def format_learning_rate(value: float) -> str:
    """Short scientific form the way people write learning rates: 1e-4, 5e-5, 2.5e-5."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    mantissa, exponent = f"{value:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def lowered_learning_rate(learning_rate: float) -> float:
    """The guide's first fix: from the preset's 1e-4 go to its unstable fallback 5e-5; otherwise halve."""
    if math.isclose(learning_rate, PRESET.learning_rate, rel_tol=1e-9):
        return PRESET.unstable_learning_rate
    return learning_rate / 2.0


def _lr_advice(learning_rate: float) -> str:
    return f"LR {format_learning_rate(learning_rate)} → {format_learning_rate(lowered_learning_rate(learning_rate))}"


def collapse_advice(
    report: CollapseReport,
    learning_rate: float,
    rank: int,
    has_regularization: bool,
    regularization_weight: float = PRESET.regularization_weight,
) -> list[str]:
    """The guide's four fixes, in its order, with this run's values. Always four strings, numbered."""
    lr_line = f"1. Lower the learning rate: {_lr_advice(learning_rate)}."
    if report.non_finite:
        lr_line += " The training loss went non-finite, which is a learning rate that is too high."

    if rank > PRESET.rank:
        rank_line = f"2. Lower the LoRA rank: rank {rank} → {PRESET.rank} (alpha = rank)."
    else:
        rank_line = f"2. Lower the LoRA rank: rank is already {rank} (the preset's {PRESET.rank} or lower), keep it."

    if has_regularization:
        reg_line = (
            f"3. Regularization: this run already mixes in a regularization set; keep its weight low "
            f"(default {regularization_weight:g}) and check its images are plain class photos."
        )
    else:
        reg_line = (
            f'3. Add a small regularization set (class images such as "photo of a person") at low weight '
            f"{regularization_weight:g}."
        )

    if report.last_good_path:
        stop_line = (
            f"4. Stop early and keep the last good checkpoint: step {report.last_good_step}, {report.last_good_path}."
        )
    else:
        stop_line = (
            f"4. Stop early: no checkpoint was saved before the collapse began at step {report.began_step}; "
            f"retrain with the changes above and save checkpoints more often."
        )
    return [lr_line, rank_line, reg_line, stop_line]


def non_finite_loss_message(step: int, learning_rate: float) -> str:
    """What to tell a user whose training loss became NaN/inf: the LR advice first."""
    return (
        f"Lower the learning rate ({_lr_advice(learning_rate)}): the training loss became non-finite (NaN or inf) "
        f"at training step {step}, so the run cannot continue from there."
    )


# --------------------------------------------------------------------------------------------------------------------
# Weak-LoRA diagnosis
# --------------------------------------------------------------------------------------------------------------------

WEAK_LORA_MIN_LOSS_DROP = 0.05  # the loss "falls" when its last quarter's median is at least 5 % below its first's
WEAK_LORA_MIN_READINGS = 8


def loss_trend(losses: Sequence[float]) -> tuple[float, float] | None:
    """Median of the first and of the last quarter of the finite readings; None if too few to judge."""
    finite = [float(v) for v in losses if is_finite(v)]
    if len(finite) < WEAK_LORA_MIN_READINGS:
        return None
    quarter = max(2, len(finite) // 4)
    return float(np.median(finite[:quarter])), float(np.median(finite[-quarter:]))


def diagnose_weak_lora(train_losses: Sequence[float], sample_steps: int, cfg: float, is_base: bool = True) -> list[str]:
    """Why does the LoRA look weak or noisy? The seed says: check the preview settings first, then train more.

    Returns the messages in the order a user should act on them.
    """
    messages: list[str] = []
    if is_base:
        problems = []
        if sample_steps < PRESET.min_base_sample_steps:
            problems.append(f"sample_steps={sample_steps} is below {PRESET.min_base_sample_steps}")
        if cfg <= PRESET.min_base_cfg:
            problems.append(f"cfg={cfg:g} is at or below {PRESET.min_base_cfg:g} (no real guidance)")
        if problems:
            messages.append(
                "Check the preview settings first: "
                + " and ".join(problems)
                + f". Klein Base needs about {PRESET.sample_steps} sample steps and CFG about {PRESET.cfg:g}; "
                "an under-sampled Base preview makes a good LoRA look weak or noisy. Re-render the previews at "
                f"{PRESET.sample_steps} sample steps and CFG {PRESET.cfg:g} before training more."
            )
    trend = loss_trend(train_losses)
    settings_first = bool(messages)
    if trend is None:
        messages.append("Too few finite training-loss readings to judge whether training is working.")
        return messages
    first, last = trend
    falling = last <= first * (1.0 - WEAK_LORA_MIN_LOSS_DROP)
    if falling:
        prefix = "Only if the re-rendered previews still look weak: " if settings_first else ""
        messages.append(
            f"{prefix}the training loss is falling ({first:.4g} → {last:.4g}), so the LoRA is learning but "
            f"under-trained: train longer (more repeats per image, toward the 90-120 'high likeness' band) "
            f"before raising the rank."
        )
    else:
        messages.append(
            f"The training loss is not falling ({first:.4g} → {last:.4g}): check that captions contain the trigger "
            f"word and that the learning rate is the preset's {format_learning_rate(PRESET.learning_rate)} before "
            f"training longer."
        )
    return messages


# --------------------------------------------------------------------------------------------------------------------
# Best checkpoint
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BestChoice:
    """The checkpoint to keep, and a sentence saying why (shown on the node, in the CLI and in run.json)."""

    step: int
    path: str
    reason: str
    metric: str  # "likeness", "validation_loss" or "latest"

    def as_dict(self) -> dict:
        return asdict(self)


def pick_best_checkpoint(history: TrainingHistory, collapse: CollapseReport | None) -> BestChoice | None:
    """Rank saved checkpoints by likeness, or by validation loss when none has a likeness; skip collapsed ones.

    Collapsed = at or after ``collapse.began_step``. Ties in likeness go to the lower validation loss, then the
    earlier step. With neither metric, the latest healthy checkpoint is chosen. None if no healthy checkpoint exists.
    """
    saved = [c for c in history.checkpoints if c.lora_path]
    healthy = [c for c in saved if collapse is None or c.step < collapse.began_step]
    excluded = len(saved) - len(healthy)
    if not healthy:
        return None
    scope = f"{len(healthy)} checkpoint{'s' if len(healthy) != 1 else ''}"
    if collapse is not None:
        scope += f" before the collapse at step {collapse.began_step}"
        scope += f" ({excluded} collapsed excluded)" if excluded else ""

    with_likeness = [c for c in healthy if is_finite(c.likeness)]
    if with_likeness:

        def key(c: CheckpointRecord) -> tuple[float, float, int]:
            val = c.validation_loss if is_finite(c.validation_loss) else math.inf
            return (-float(c.likeness), val, c.step)  # type: ignore[arg-type]

        best = min(with_likeness, key=key)
        backend = f", {history.likeness_backend}" if history.likeness_backend else ""
        return BestChoice(
            best.step,
            best.lora_path,  # type: ignore[arg-type]
            f"step {best.step} has the highest likeness ({best.likeness:.3f}{backend}) among {scope}",
            "likeness",
        )
    # held-out images judge generalisation; the training images' loss only keeps falling as the LoRA memorises them
    for attr, label in (("held_out_loss", "held-out validation loss"), ("validation_loss", "validation loss")):
        with_val = [c for c in healthy if is_finite(getattr(c, attr))]
        if with_val:
            best = min(with_val, key=lambda c: (getattr(c, attr), c.step))
            return BestChoice(
                best.step,
                best.lora_path,  # type: ignore[arg-type]
                f"step {best.step} has the lowest {label} ({getattr(best, attr):.4g}) among {scope}; "
                f"no likeness score was available",
                attr,
            )
    best = healthy[-1]
    return BestChoice(
        best.step,
        best.lora_path,  # type: ignore[arg-type]
        f"step {best.step} is the latest of {scope}; neither likeness nor validation loss was recorded",
        "latest",
    )
