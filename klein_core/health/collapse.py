"""Training health: collapse detection, the seed's ordered advice, weak-LoRA diagnosis and best-checkpoint choice.

Klein 9B Base can "collapse": a run gets better, then turns to chaos. This module watches four signals the trainer
feeds it and says *when* it began, *which checkpoint* to keep and *what to change*, in the seed's order:

1. lower the learning rate (1e-4 → 5e-5),
2. lower the rank (32 → 16),
3. add a small regularization set at a low weight,
4. stop early and keep the last good checkpoint.

Everything here is pure (numbers in, dataclasses out) so it is tested on synthetic histories and reused by the
trainer, the CLI, the ComfyUI nodes and the report chart. Nothing imports torch.

Signals (thresholds in :class:`CollapseThresholds`, each documented there):

- ``validation_loss_rising``: the fixed-noise validation loss, smoothed with an EMA over checkpoints, rises clearly
  above its minimum. The fixed noise and σ make it comparable across checkpoints, unlike the training loss.
- ``training_loss_non_finite``: a NaN or ±inf training-loss reading.
- ``training_loss_spikes``: readings far above a trailing median, measured as a robust z-score (median/MAD).
- ``training_loss_diverging``: the rolling median of the training loss climbs to a multiple of its lowest value
  (a too-high learning rate often lifts the loss to a new level rather than spiking it).
- ``preview_blowout``: preview statistics (:func:`preview_statistics`) blow out against earlier checkpoints:
  saturation or clipping, high-frequency noise, or colour collapse.
- ``likeness_drop``: likeness per checkpoint (smoothed) falls clearly below its peak.

A collapse "begins" at the first bad training-loss reading or the first bad checkpoint; the last good checkpoint is
the last saved LoRA strictly before that step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..preset import PRESET

VALIDATION_LOSS_RISING = "validation_loss_rising"
TRAINING_LOSS_NON_FINITE = "training_loss_non_finite"
TRAINING_LOSS_SPIKES = "training_loss_spikes"
TRAINING_LOSS_DIVERGING = "training_loss_diverging"
PREVIEW_BLOWOUT = "preview_blowout"
LIKENESS_DROP = "likeness_drop"
SIGNAL_NAMES = (
    VALIDATION_LOSS_RISING,
    TRAINING_LOSS_NON_FINITE,
    TRAINING_LOSS_SPIKES,
    TRAINING_LOSS_DIVERGING,
    PREVIEW_BLOWOUT,
    LIKENESS_DROP,
)

SIGNAL_DESCRIPTIONS = {
    VALIDATION_LOSS_RISING: "validation loss rising after its minimum",
    TRAINING_LOSS_NON_FINITE: "non-finite training loss",
    TRAINING_LOSS_SPIKES: "training-loss spikes",
    TRAINING_LOSS_DIVERGING: "training loss diverging to a higher level",
    PREVIEW_BLOWOUT: "previews blowing out",
    LIKENESS_DROP: "likeness dropping after its peak",
}


# --------------------------------------------------------------------------------------------------------------------
# JSON helpers: run.json must stay strict JSON (the browser's JSON.parse rejects NaN), so non-finite floats are strings.
# --------------------------------------------------------------------------------------------------------------------


def _float_to_json(value: float | None) -> float | str | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _float_from_json(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)  # float("nan"), float("inf") and float("-inf") parse the strings written above


def _is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# --------------------------------------------------------------------------------------------------------------------
# Preview statistics
# --------------------------------------------------------------------------------------------------------------------

CLIP_LOW = 0.5 / 255.0
CLIP_HIGH = 254.5 / 255.0
WHITE_NOISE_LAPLACIAN_GAIN = 20.0  # E[lap(x)^2] / Var(x) for i.i.d. pixels with the 4-neighbour Laplacian (16 + 4)
DOMINANT_COLOUR_LEVELS = 4  # bins per RGB channel for the dominant-colour share (4^3 = 64 colour bins)


@dataclass(frozen=True)
class PreviewStats:
    """Summary statistics of a checkpoint's preview images (mean over the images).

    Each one is chosen to move a lot when a diffusion LoRA collapses and little when it merely learns a face:

    - ``clipped_fraction``: share of pixels with any channel at 0 or 1 (within half a level of 8-bit):
      blown-out highlights, crushed blacks, neon colours. 0 = none, 1 = every pixel.
    - ``mean_saturation``: mean HSV saturation, ``(max - min) / max`` per pixel (0 for black). Collapsed previews
      often turn oversaturated.
    - ``high_frequency_energy``: mean squared 4-neighbour Laplacian of the grey image divided by 20 × its variance.
      About 1 for white noise, near 0 for smooth photos: the share of the image's energy in pixel-level noise.
    - ``colour_std``: mean over R, G, B of each channel's standard deviation across pixels (0 = a flat image,
      about 0.2-0.3 for a photo). A collapse to one flat colour drives it to 0.
    - ``dominant_colour_fraction``: share of pixels in the most populated of 64 coarse RGB bins (4 levels per
      channel). 1.0 means a single colour fills the image.
    """

    clipped_fraction: float
    mean_saturation: float
    high_frequency_energy: float
    colour_std: float
    dominant_colour_fraction: float
    image_count: int = 1

    def as_dict(self) -> dict:
        return {k: (_float_to_json(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "PreviewStats":
        return cls(
            clipped_fraction=float(_float_from_json(data["clipped_fraction"])),
            mean_saturation=float(_float_from_json(data["mean_saturation"])),
            high_frequency_energy=float(_float_from_json(data["high_frequency_energy"])),
            colour_std=float(_float_from_json(data["colour_std"])),
            dominant_colour_fraction=float(_float_from_json(data["dominant_colour_fraction"])),
            image_count=int(data.get("image_count", 1)),
        )


def as_rgb_float_images(images: Any) -> list[np.ndarray]:
    """Turn previews into a list of float32 HxWx3 arrays in [0, 1].

    Accepts a PIL image, an array (HxW, HxWx3/4 or a BxHxWxC batch such as ComfyUI's IMAGE tensor on CPU), or a
    sequence of those. uint8 arrays are divided by 255; float arrays are taken as [0, 1] and clipped.
    """
    if _is_single_image(images):
        items: Iterable[Any] = [images]
    else:
        items = images
    out: list[np.ndarray] = []
    for item in items:
        if hasattr(item, "convert") and hasattr(item, "size") and not isinstance(item, np.ndarray):  # PIL image
            arr = np.asarray(item.convert("RGB"), dtype=np.float32) / 255.0
            out.append(arr)
            continue
        arr = _to_numpy(item)
        if arr.ndim == 4:
            out.extend(as_rgb_float_images(list(arr)))
            continue
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        else:
            arr = np.clip(np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"preview image must be HxW, HxWx3 or HxWx4, got shape {tuple(arr.shape)}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        out.append(np.ascontiguousarray(arr[..., :3]))
    if not out:
        raise ValueError("no preview images given")
    return out


def _to_numpy(item: Any) -> np.ndarray:
    if hasattr(item, "detach"):  # a torch tensor, without importing torch here
        item = item.detach().to("cpu").float().numpy()
    return np.asarray(item)


def _is_single_image(images: Any) -> bool:
    if hasattr(images, "convert") and hasattr(images, "size") and not isinstance(images, np.ndarray):
        return True
    if isinstance(images, np.ndarray) or hasattr(images, "detach"):
        return True  # one image or one batch: both handled by the array branch
    return False


def _single_image_stats(img: np.ndarray) -> tuple[float, float, float, float, float]:
    clipped = ((img <= CLIP_LOW) | (img >= CLIP_HIGH)).any(axis=-1).mean()

    cmax = img.max(axis=-1)
    cmin = img.min(axis=-1)
    saturation = np.where(cmax > 1e-6, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0).mean()

    grey = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if grey.shape[0] >= 3 and grey.shape[1] >= 3:
        lap = (
            4.0 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
        )
        variance = float(grey.var())
        energy = float((lap.astype(np.float64) ** 2).mean())
        hf = energy / (WHITE_NOISE_LAPLACIAN_GAIN * variance) if variance > 1e-10 else 0.0
    else:
        hf = 0.0

    colour_std = float(img.reshape(-1, 3).std(axis=0).mean())

    levels = DOMINANT_COLOUR_LEVELS
    q = np.minimum((img * levels).astype(np.int64), levels - 1)
    codes = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    dominant = np.bincount(codes.ravel(), minlength=levels**3).max() / codes.size

    return float(clipped), float(saturation), hf, colour_std, float(dominant)


def preview_statistics(images: Any) -> PreviewStats:
    """Compute :class:`PreviewStats` over one checkpoint's previews (mean of the per-image statistics)."""
    arrays = as_rgb_float_images(images)
    per_image = np.array([_single_image_stats(a) for a in arrays], dtype=np.float64)
    mean = per_image.mean(axis=0)
    return PreviewStats(
        clipped_fraction=float(mean[0]),
        mean_saturation=float(mean[1]),
        high_frequency_energy=float(mean[2]),
        colour_std=float(mean[3]),
        dominant_colour_fraction=float(mean[4]),
        image_count=len(arrays),
    )


# --------------------------------------------------------------------------------------------------------------------
# Training history: what the trainer fills
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CheckpointRecord:
    """One checkpoint: its training step, its LoRA file (None for the no-LoRA control at step 0) and its health."""

    step: int
    lora_path: str | None
    validation_loss: float | None = None
    preview_stats: PreviewStats | None = None
    likeness: float | None = None
    held_out_loss: float | None = None  # the same fixed-noise loss on images kept out of training (if the user has some)

    def as_dict(self) -> dict:
        return {
            "step": self.step,
            "lora_path": self.lora_path,
            "validation_loss": _float_to_json(self.validation_loss),
            "held_out_loss": _float_to_json(self.held_out_loss),
            "preview_stats": self.preview_stats.as_dict() if self.preview_stats else None,
            "likeness": _float_to_json(self.likeness),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointRecord":
        stats = data.get("preview_stats")
        return cls(
            step=int(data["step"]),
            lora_path=data.get("lora_path"),
            validation_loss=_float_from_json(data.get("validation_loss")),
            preview_stats=PreviewStats.from_dict(stats) if stats else None,
            likeness=_float_from_json(data.get("likeness")),
            held_out_loss=_float_from_json(data.get("held_out_loss")),
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
        record = CheckpointRecord(int(step), lora_path, validation_loss, preview_stats, likeness, held_out_loss)
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
            "losses": [_float_to_json(v) for v in self.losses],
            "checkpoints": [c.as_dict() for c in self.checkpoints],
            "likeness_backend": self.likeness_backend,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingHistory":
        return cls(
            loss_steps=[int(s) for s in data.get("loss_steps", [])],
            losses=[float(_float_from_json(v)) for v in data.get("losses", [])],
            checkpoints=[CheckpointRecord.from_dict(c) for c in data.get("checkpoints", [])],
            likeness_backend=data.get("likeness_backend"),
        )


# --------------------------------------------------------------------------------------------------------------------
# Collapse detection
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollapseThresholds:
    """When each signal fires. Defaults catch a clearly diverging run and stay quiet on a noisy but falling one.

    Validation loss (fixed noise and σ, one value per checkpoint):
      ``validation_ema_alpha``: EMA weight of the newest checkpoint (0.5: a single bad checkpoint counts half).
      ``validation_rise_fraction``: fire when the smoothed loss exceeds its earlier minimum by this fraction
      (0.20 = 20 %; a healthy run's fixed-noise loss on its own training images keeps falling or plateaus).
      ``validation_min_checkpoints``: judge only from this many checkpoints with a validation loss (3).
      A non-finite validation loss fires at once. The same rule watches the held-out images' loss when the user
      has held some out; the earlier of the two is reported.

    Training loss (one reading per training step or per log interval):
      ``loss_window_readings``: trailing window for the median and MAD (50 readings, the current one excluded).
      ``loss_min_history``: readings needed in the window before judging spikes (20); early steps fall fast.
      ``loss_spike_z``: robust z = (loss - median) / (1.4826 × MAD); a reading at or above 10 is a spike.
      ``loss_spikes_to_fire`` within ``loss_spike_span_readings``: 3 spikes within 25 readings fire. Simulated
      healthy runs (3000 readings, log-normal noise of σ = 0.5 and 0.6, 40 seeds each) never fired; a batch-1
      flow-matching loss is usually narrower than that.
      ``loss_extreme_z``: one reading this far above (50) fires alone; a healthy flow-matching loss is bounded.
      ``loss_scale_floor_fraction``: the robust scale is at least 2 % of the median, so a near-constant loss
      does not turn tiny wobbles into huge z-scores.
      ``loss_level_window``/``loss_level_rise_factor``: the rolling median of 50 readings reaching 2.5× its lowest
      earlier value fires as divergence (a falling or plateauing loss does not: simulated runs of 3000 readings with
      log-normal noise up to σ = 0.7 never did).
      Any non-finite reading fires at once.

    Preview statistics (see :class:`PreviewStats`), each checkpoint against the median of all earlier ones (the
    trainer renders step 0, the untrained base, too, so the first checkpoint already has a baseline):
      high-frequency noise at least ``preview_hf_ratio`` (3×) the baseline and ``preview_hf_min_increase``
      (0.15, i.e. 15 % of the image's energy turned into pixel noise) above it; clipped pixels up by
      ``preview_clipped_increase`` (0.25 of the image); saturation up by ``preview_saturation_increase`` (0.30);
      colour collapse: colour std down to ``preview_colour_std_ratio``
      (35 %) of the baseline and by at least ``preview_colour_std_min_decrease`` (0.03), or the dominant colour's
      share up by ``preview_dominant_increase`` (0.40). ``preview_min_baseline`` (1) earlier checkpoint needed.

    Likeness (0-1, one value per checkpoint), smoothed with an EMA of weight ``likeness_ema_alpha`` (0.5):
      fire when the smoothed likeness falls ``likeness_drop_fraction`` (25 %) below its earlier peak and by at
      least ``likeness_min_drop`` (0.05), once ``likeness_min_checkpoints`` (3) have a likeness.
    """

    validation_ema_alpha: float = 0.5
    validation_rise_fraction: float = 0.20
    validation_min_checkpoints: int = 3

    loss_window_readings: int = 50
    loss_min_history: int = 20
    loss_spike_z: float = 10.0
    loss_spikes_to_fire: int = 3
    loss_spike_span_readings: int = 25
    loss_extreme_z: float = 50.0
    loss_scale_floor_fraction: float = 0.02
    loss_level_window: int = 50
    loss_level_rise_factor: float = 2.5

    preview_hf_ratio: float = 3.0
    preview_hf_min_increase: float = 0.15
    preview_clipped_increase: float = 0.25
    preview_saturation_increase: float = 0.30
    preview_colour_std_ratio: float = 0.35
    preview_colour_std_min_decrease: float = 0.03
    preview_dominant_increase: float = 0.40
    preview_min_baseline: int = 1

    likeness_ema_alpha: float = 0.5
    likeness_drop_fraction: float = 0.25
    likeness_min_drop: float = 0.05
    likeness_min_checkpoints: int = 3

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CollapseSignal:
    """One signal that fired: when the trouble began, when it became certain, and a sentence with the numbers."""

    name: str
    began_step: int
    detected_step: int
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CollapseReport:
    """What the detector found.

    ``began_step``: the earliest step any signal points at (first bad reading or first bad checkpoint).
    ``detected_step``: the step at which the first signal became certain; a live trainer stops here.
    ``last_good_step``/``last_good_path``: the last saved LoRA strictly before ``began_step``, or None if the
    collapse began before any LoRA was saved.
    """

    signals: tuple[CollapseSignal, ...]
    began_step: int
    detected_step: int
    last_good_step: int | None
    last_good_path: str | None

    @property
    def signal_names(self) -> list[str]:
        return [s.name for s in self.signals]

    @property
    def non_finite(self) -> bool:
        return TRAINING_LOSS_NON_FINITE in self.signal_names

    def summary(self) -> str:
        names = ", ".join(SIGNAL_DESCRIPTIONS[n] for n in self.signal_names)
        good = (
            f"last good checkpoint: step {self.last_good_step} ({self.last_good_path})"
            if self.last_good_path
            else "no checkpoint was saved before it began"
        )
        return f"collapse began at training step {self.began_step} ({names}); {good}"

    def as_dict(self) -> dict:
        return {
            "step": self.began_step,
            "began_step": self.began_step,
            "detected_step": self.detected_step,
            "signals": [s.as_dict() for s in self.signals],
            "last_good_checkpoint": self.last_good_path,
            "last_good_step": self.last_good_step,
            "summary": self.summary(),
        }


def _ema(values: Sequence[float], alpha: float) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1.0 - alpha) * out[-1])
    return out


def _validation_signal(history: TrainingHistory, th: CollapseThresholds) -> CollapseSignal | None:
    """The validation loss on the training images, or on the held-out images, rising clearly: the earlier of the two."""
    fired = [signal for attr, label in (("validation_loss", "validation loss"), ("held_out_loss", "held-out validation loss"))
             if (signal := _rising_signal([(c.step, getattr(c, attr)) for c in history.checkpoints
                                           if getattr(c, attr) is not None], label, th))]
    return min(fired, key=lambda signal: signal.began_step) if fired else None


def _rising_signal(points: list[tuple[int, float]], label: str, th: CollapseThresholds) -> CollapseSignal | None:
    if not points:
        return None
    steps = [s for s, _ in points]
    raw = [v if math.isfinite(v) else math.inf for _, v in points]
    for i, v in enumerate(raw):
        if math.isinf(v):
            return CollapseSignal(
                VALIDATION_LOSS_RISING, steps[i], steps[i], f"{label} became non-finite at step {steps[i]}"
            )
    smooth = _ema(raw, th.validation_ema_alpha)
    for i in range(max(1, th.validation_min_checkpoints - 1), len(smooth)):
        earlier_min = min(smooth[:i])
        if smooth[i] - earlier_min > th.validation_rise_fraction * abs(earlier_min) and smooth[i] > earlier_min:
            best = int(np.argmin(raw[: i + 1]))
            began = steps[min(best + 1, i)]
            rise = (smooth[i] / earlier_min - 1.0) * 100.0 if earlier_min > 0 else math.inf
            return CollapseSignal(
                VALIDATION_LOSS_RISING,
                began,
                steps[i],
                f"smoothed {label} rose {rise:.0f}% above its minimum (lowest raw {raw[best]:.4g} at step "
                f"{steps[best]}, now {raw[i]:.4g} at step {steps[i]}; threshold "
                f"{th.validation_rise_fraction * 100:.0f}%)",
            )
    return None


def _robust_z_scores(values: np.ndarray, th: CollapseThresholds) -> tuple[np.ndarray, np.ndarray]:
    """Robust z-score of each reading against the trailing window before it (NaN where the window is too short)."""
    n = values.size
    w = th.loss_window_readings
    finite = np.where(np.isfinite(values), values, np.nan)
    padded = np.concatenate([np.full(w, np.nan), finite])
    windows = np.lib.stride_tricks.sliding_window_view(padded, w)[:n]  # windows[i] = readings i-w .. i-1
    counts = np.count_nonzero(~np.isnan(windows), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows at the start
        medians = np.nanmedian(windows, axis=1)
        mads = np.nanmedian(np.abs(windows - medians[:, None]), axis=1)
    scale = np.maximum(np.maximum(1.4826 * mads, th.loss_scale_floor_fraction * np.abs(medians)), 1e-12)
    z = (finite - medians) / scale
    z[(counts < th.loss_min_history) | np.isnan(z)] = -np.inf
    return z, medians


def _training_loss_signals(history: TrainingHistory, th: CollapseThresholds) -> list[CollapseSignal]:
    signals: list[CollapseSignal] = []
    steps = history.loss_steps
    values = np.asarray(history.losses, dtype=np.float64)
    if values.size == 0:
        return signals
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        signals.append(
            CollapseSignal(
                TRAINING_LOSS_NON_FINITE, steps[i], steps[i], f"training loss was {values[i]} at step {steps[i]}"
            )
        )
    limit = int(np.argmax(bad)) if bad.any() else values.size  # spikes are judged before the first non-finite reading
    z, medians = _robust_z_scores(values, th)
    spikes: list[int] = []
    for i in np.flatnonzero(z[:limit] >= th.loss_spike_z):
        i = int(i)
        spikes.append(i)
        recent = [j for j in spikes if i - j < th.loss_spike_span_readings]
        extreme = z[i] >= th.loss_extreme_z
        if len(recent) >= th.loss_spikes_to_fire or extreme:
            first = recent[0]
            why = (
                f"robust z {z[i]:.0f} >= {th.loss_extreme_z:g} for a single reading"
                if extreme
                else f"{len(recent)} spikes with robust z >= {th.loss_spike_z:g} "
                f"within {th.loss_spike_span_readings} readings"
            )
            signals.append(
                CollapseSignal(
                    TRAINING_LOSS_SPIKES,
                    steps[first],
                    steps[i],
                    f"training loss spiked from step {steps[first]}: {values[i]:.4g} at step {steps[i]} vs a "
                    f"trailing median of {medians[i]:.4g} ({why})",
                )
            )
            break
    level = _level_shift_signal(values[:limit], steps, th)
    if level is not None:
        signals.append(level)
    return signals


def _level_shift_signal(values: np.ndarray, steps: Sequence[int], th: CollapseThresholds) -> CollapseSignal | None:
    w = th.loss_level_window
    if values.size < w + 1:
        return None
    medians = np.median(np.lib.stride_tricks.sliding_window_view(values, w), axis=1)  # medians[k]: readings k..k+w-1
    lowest = np.minimum.accumulate(medians)
    for k in range(1, medians.size):
        floor = lowest[k - 1]
        if floor > 0 and medians[k] >= th.loss_level_rise_factor * floor:
            end = k + w - 1
            window = values[k : end + 1]
            first = k + int(np.argmax(window >= th.loss_level_rise_factor * floor))
            return CollapseSignal(
                TRAINING_LOSS_DIVERGING,
                steps[first],
                steps[end],
                f"the median of the last {w} training-loss readings rose to {medians[k]:.4g} at step {steps[end]}, "
                f"{medians[k] / floor:.1f}× its lowest {floor:.4g} (threshold {th.loss_level_rise_factor:g}×)",
            )
    return None


def _preview_signal(history: TrainingHistory, th: CollapseThresholds) -> CollapseSignal | None:
    points = [(c.step, c.preview_stats) for c in history.checkpoints if c.preview_stats is not None]
    for i in range(th.preview_min_baseline, len(points)):
        step, s = points[i]
        earlier = [p for _, p in points[:i]]

        def base(attr: str, earlier: list = earlier) -> float:
            return float(np.median([getattr(p, attr) for p in earlier]))

        reasons: list[str] = []
        hf0 = base("high_frequency_energy")
        if (
            s.high_frequency_energy >= th.preview_hf_ratio * hf0
            and s.high_frequency_energy - hf0 >= th.preview_hf_min_increase
        ):
            reasons.append(f"high-frequency noise {hf0:.3f} → {s.high_frequency_energy:.3f}")
        clip0 = base("clipped_fraction")
        if s.clipped_fraction - clip0 >= th.preview_clipped_increase:
            reasons.append(f"clipped pixels {clip0:.0%} → {s.clipped_fraction:.0%}")
        sat0 = base("mean_saturation")
        if s.mean_saturation - sat0 >= th.preview_saturation_increase:
            reasons.append(f"saturation {sat0:.2f} → {s.mean_saturation:.2f}")
        std0 = base("colour_std")
        if (
            s.colour_std <= th.preview_colour_std_ratio * std0
            and std0 - s.colour_std >= th.preview_colour_std_min_decrease
        ):
            reasons.append(f"colour collapse (colour std {std0:.3f} → {s.colour_std:.3f})")
        dom0 = base("dominant_colour_fraction")
        if s.dominant_colour_fraction - dom0 >= th.preview_dominant_increase:
            reasons.append(f"one colour fills {s.dominant_colour_fraction:.0%} of the image (was {dom0:.0%})")
        if reasons:
            return CollapseSignal(
                PREVIEW_BLOWOUT,
                step,
                step,
                f"previews at step {step} blew out against earlier checkpoints: " + "; ".join(reasons),
            )
    return None


def _likeness_signal(history: TrainingHistory, th: CollapseThresholds) -> CollapseSignal | None:
    # step 0 (the untrained base) is context for the chart, not a peak to fall from; pruned checkpoints still count
    points = [(c.step, c.likeness) for c in history.checkpoints if c.step > 0 and _is_finite(c.likeness)]
    if len(points) < th.likeness_min_checkpoints:
        return None
    steps = [s for s, _ in points]
    raw = [v for _, v in points]
    smooth = _ema(raw, th.likeness_ema_alpha)
    for i in range(max(1, th.likeness_min_checkpoints - 1), len(smooth)):
        peak = max(smooth[:i])
        drop = peak - smooth[i]
        if drop >= th.likeness_drop_fraction * abs(peak) and drop >= th.likeness_min_drop:
            best = int(np.argmax(raw[: i + 1]))
            began = steps[min(best + 1, i)]
            return CollapseSignal(
                LIKENESS_DROP,
                began,
                steps[i],
                f"likeness fell from its peak {raw[best]:.3f} at step {steps[best]} to {raw[i]:.3f} at step "
                f"{steps[i]} (smoothed drop {drop / peak if peak > 0 else 1.0:.0%}, "
                f"threshold {th.likeness_drop_fraction:.0%})",
            )
    return None


def detect_collapse(
    history: TrainingHistory, config: CollapseThresholds = CollapseThresholds()
) -> CollapseReport | None:
    """Check every signal over the history so far; None when the run looks healthy.

    Safe to call after every log interval or checkpoint: a live trainer stops when this first returns a report
    (if the user asked for auto-stop) and keeps ``report.last_good_path``.
    """
    signals: list[CollapseSignal] = []
    for found in (
        _validation_signal(history, config),
        *_training_loss_signals(history, config),
        _preview_signal(history, config),
        _likeness_signal(history, config),
    ):
        if found is not None:
            signals.append(found)
    if not signals:
        return None
    signals.sort(key=lambda s: (s.began_step, SIGNAL_NAMES.index(s.name)))
    began = min(s.began_step for s in signals)
    detected = min(s.detected_step for s in signals)
    good = [c for c in history.checkpoints if c.lora_path and c.step < began]
    last_good = good[-1] if good else None
    return CollapseReport(
        signals=tuple(signals),
        began_step=began,
        detected_step=detected,
        last_good_step=last_good.step if last_good else None,
        last_good_path=last_good.lora_path if last_good else None,
    )


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
    """The seed's first fix: from the preset's 1e-4 go to its unstable fallback 5e-5; otherwise halve."""
    if math.isclose(learning_rate, PRESET.learning_rate, rel_tol=1e-9):
        return PRESET.unstable_learning_rate
    return learning_rate / 2.0


def _lr_advice(learning_rate: float) -> str:
    return (
        f"LR {format_learning_rate(learning_rate)} → {format_learning_rate(lowered_learning_rate(learning_rate))}"
    )


def collapse_advice(
    report: CollapseReport,
    learning_rate: float,
    rank: int,
    has_regularization: bool,
    regularization_weight: float = PRESET.regularization_weight,
) -> list[str]:
    """The seed's four fixes, in its order, with this run's values. Always four strings, numbered."""
    lr_line = f"1. Lower the learning rate: {_lr_advice(learning_rate)}."
    if report.non_finite:
        lr_line += " The training loss went non-finite, which is a learning rate that is too high."

    if rank > PRESET.rank:
        rank_line = f"2. Lower the LoRA rank: rank {rank} → {PRESET.rank} (alpha = rank)."
    else:
        rank_line = (
            f"2. Lower the LoRA rank: rank is already {rank} (the preset's {PRESET.rank} or lower), keep it."
        )

    if has_regularization:
        reg_line = (
            f"3. Regularization: this run already mixes in a regularization set; keep its weight low "
            f"(default {regularization_weight:g}) and check its images are plain class photos."
        )
    else:
        reg_line = (
            f"3. Add a small regularization set (class images such as \"photo of a person\") at low weight "
            f"{regularization_weight:g}."
        )

    if report.last_good_path:
        stop_line = (
            f"4. Stop early and keep the last good checkpoint: step {report.last_good_step}, "
            f"{report.last_good_path}."
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
    finite = [float(v) for v in losses if _is_finite(v)]
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

    with_likeness = [c for c in healthy if _is_finite(c.likeness)]
    if with_likeness:

        def key(c: CheckpointRecord) -> tuple[float, float, int]:
            val = c.validation_loss if _is_finite(c.validation_loss) else math.inf
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
        with_val = [c for c in healthy if _is_finite(getattr(c, attr))]
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
