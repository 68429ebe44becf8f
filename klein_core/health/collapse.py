"""Collapse detection: when a run that got better turns to chaos, and the last good checkpoint before it.

Klein 9B Base can "collapse": a run gets better, then turns to chaos. This module watches four signals the trainer
feeds it and says *when* it began and *which checkpoint* to keep; ``advice`` says *what to change*, in the order of
the Klein 9B character guide:

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
- ``likeness_drop``: likeness per checkpoint (smoothed) falls clearly below its peak, or from above the untrained
  base's likeness to under it.

A collapse "begins" at the first bad training-loss reading or the first bad checkpoint; the last good checkpoint is
the last saved LoRA strictly before that step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .history import TrainingHistory
from .json_floats import is_finite

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
      fire when the smoothed likeness, or the better of the last two checkpoints' likeness, falls
      ``likeness_drop_fraction`` (25 %) below the smoothed likeness's earlier peak and by at least
      ``likeness_min_drop`` (0.05), or by that much to under the untrained base's likeness (step 0) after rising
      above it, once ``likeness_min_checkpoints`` (3) have a likeness. The smoothed value
      catches a slide; the last two catch a sudden fall at once (the EMA needs a third bad checkpoint to follow a
      fall from 0.80 to 0.53 past 25 %: a 30x-LR run on an earlier tiny Klein) while one bad preview alone never fires.
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
    fired = [
        signal
        for attr, label in (("validation_loss", "validation loss"), ("held_out_loss", "held-out validation loss"))
        if (
            signal := _rising_signal(
                [(c.step, getattr(c, attr)) for c in history.checkpoints if getattr(c, attr) is not None], label, th
            )
        )
    ]
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
    # step 0 (the untrained base) is a baseline, not a peak to fall from; pruned checkpoints still count
    base = next((c.likeness for c in history.checkpoints if c.step == 0 and is_finite(c.likeness)), None)
    points = [(c.step, c.likeness) for c in history.checkpoints if c.step > 0 and is_finite(c.likeness)]
    if len(points) < th.likeness_min_checkpoints:
        return None
    steps = [s for s, _ in points]
    raw = [v for _, v in points]
    smooth = _ema(raw, th.likeness_ema_alpha)
    for i in range(max(1, th.likeness_min_checkpoints - 1), len(smooth)):
        peak = max(smooth[:i])
        held = max(raw[i - 1], raw[i])  # the better of the last two checkpoints: one bad preview is not a fall
        drop = peak - min(smooth[i], held)  # the lower of the slide and the last two checkpoints
        below_base = base is not None and held < base < peak and peak - held >= th.likeness_min_drop
        if below_base or (drop >= th.likeness_min_drop and drop >= th.likeness_drop_fraction * abs(peak)):
            best = int(np.argmax(raw[: i + 1]))
            # it began at the first checkpoint after the best one that is clearly lower (not a near-equal one)
            began = next((j for j in range(best + 1, i) if raw[best] - raw[j] >= th.likeness_min_drop), i)
            under = f", under the untrained base's {base:.3f}" if below_base else ""
            return CollapseSignal(
                LIKENESS_DROP,
                steps[began],
                steps[i],
                f"likeness fell from its peak {raw[best]:.3f} at step {steps[best]} to {raw[i]:.3f} at step "
                f"{steps[i]} ({drop / peak if peak > 0 else 1.0:.0%} below the smoothed peak, "
                f"threshold {th.likeness_drop_fraction:.0%}{under})",
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
