"""Repeats planning: the dose of a LoRA run is its repeats per image.

    repeats_per_image = S * B * G / N        S = ceil(N * R / (B * G))

N images, B batch size, G gradient accumulation, S training steps (optimizer updates), R target repeats.
A training step is one optimizer update over G micro-batches of B images; it is never a sample step.
Everything is computed exactly with fractions, so N=3, R=100, B=1, G=3 gives 100 steps, not 101.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from fractions import Fraction

from ..errors import PlanError
from ..preset import PRESET

UNDER_TRAINED, NORMAL_IDENTITY, HIGH_LIKENESS, OVER_TRAINING = (
    "under-trained",
    "normal identity",
    "high likeness",
    "over-training risk",
)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, str) and value.strip().lstrip("+").isdigit():
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise PlanError(f"{name} must be a whole number >= 1, got {value!r}")
    if int(value) < 1:
        raise PlanError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def _positive_number(name: str, value: object) -> Fraction:
    if isinstance(value, bool):
        raise PlanError(f"{name} must be a number > 0, got {value!r}")
    try:
        exact = Fraction(str(value).strip()) if isinstance(value, (str, float)) else Fraction(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise PlanError(f"{name} must be a number > 0, got {value!r}") from None
    if not math.isfinite(float(exact)) or exact <= 0:
        raise PlanError(f"{name} must be a number > 0, got {value!r}")
    return exact


def band(repeats_per_image: float) -> str:
    """Name the dose: below 50 under-trained, 50-90 normal identity, 90-120 high likeness, above 120 risk."""
    if repeats_per_image < 50:
        return UNDER_TRAINED
    if repeats_per_image < 90:
        return NORMAL_IDENTITY
    if repeats_per_image <= 120:
        return HIGH_LIKENESS
    return OVER_TRAINING


def training_steps_for(images: int, target_repeats: float, batch_size: int = 1, grad_accum: int = 1) -> int:
    """S = ceil(N*R/(B*G)), exactly."""
    n = _positive_int("images", images)
    r = _positive_number("target_repeats", target_repeats)
    b = _positive_int("batch_size", batch_size)
    g = _positive_int("grad_accum", grad_accum)
    return math.ceil(n * r / (b * g))


def repeats_per_image_for(training_steps: int, images: int, batch_size: int = 1, grad_accum: int = 1) -> float:
    """repeats_per_image = S*B*G/N."""
    s = _positive_int("training_steps", training_steps)
    n = _positive_int("images", images)
    b = _positive_int("batch_size", batch_size)
    g = _positive_int("grad_accum", grad_accum)
    return float(Fraction(s * b * g, n))


@dataclass(frozen=True)
class Plan:
    """A planned run, in the Klein 9B character guide's language. ``epochs`` = passes over the image set = repeats
    per image."""

    images: int
    batch_size: int
    grad_accum: int
    training_steps: int
    repeats_per_image: float
    band: str
    epochs: float
    images_per_training_step: int
    target_repeats: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def estimate_kwargs(self) -> dict:
        """The run's size as ``estimate``'s keyword arguments, so the estimate shown beside a plan is of that run."""
        return {name: getattr(self, name) for name in ("training_steps", "batch_size", "grad_accum", "images")}

    def summary(self) -> str:
        aim = f" (target {self.target_repeats:g})" if self.target_repeats is not None else ""
        return (
            f"{self.images} images, batch {self.batch_size} x grad accum {self.grad_accum} = "
            f"{self.images_per_training_step} images per training step\n"
            f"training steps: {self.training_steps}\n"
            f"repeats per image: {self.repeats_per_image:.1f}{aim} -> {self.band}\n"
            f"epochs: {self.epochs:.1f}"
        )


def plan(
    images: int,
    target_repeats: float | None = PRESET.target_repeats,
    batch_size: int = PRESET.batch_size,
    grad_accum: int = PRESET.grad_accum,
    training_steps: int | None = None,
) -> Plan:
    """Plan a run from a target dose, or report the dose of a given ``training_steps``.

    Changing ``grad_accum`` or ``batch_size`` re-derives the steps so the dose stays the same.
    """
    n = _positive_int("images", images)
    b = _positive_int("batch_size", batch_size)
    g = _positive_int("grad_accum", grad_accum)
    if training_steps is None:
        if target_repeats is None:
            raise PlanError("give target_repeats or training_steps")
        steps = training_steps_for(n, target_repeats, b, g)
        target = float(_positive_number("target_repeats", target_repeats))
    else:
        steps = _positive_int("training_steps", training_steps)
        target = None
    rpi = repeats_per_image_for(steps, n, b, g)
    return Plan(
        images=n,
        batch_size=b,
        grad_accum=g,
        training_steps=steps,
        repeats_per_image=rpi,
        band=band(rpi),
        epochs=rpi,
        images_per_training_step=b * g,
        target_repeats=target,
    )
