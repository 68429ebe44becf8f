"""The training report: a chart of a run's health and a text verdict, drawn with PIL alone (no matplotlib).

Top panel: training loss (raw readings faint, EMA-smoothed bold; non-finite readings as marks on the top edge) and
the fixed-noise validation loss per checkpoint (and that of the held-out images, if any). Bottom panel: likeness per
checkpoint. Both share the x axis, "training step". A red vertical line marks where a collapse began (the region
after it is shaded) and a green dashed line marks the best checkpoint. The same image is written to the run folder
and returned by the report node.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_write
from .advice import BestChoice
from .collapse import SIGNAL_DESCRIPTIONS, CollapseReport
from .history import TrainingHistory

Colour = tuple[int, int, int]

# Colours by role (the series use matplotlib's category-10 hues, so the chart reads like a familiar plot).
BACKGROUND, TEXT_COLOUR, AXIS_COLOUR, GRID_COLOUR = (255, 255, 255), (30, 30, 30), (60, 60, 60), (228, 228, 228)
RAW_LOSS_COLOUR, SMOOTH_LOSS_COLOUR, NON_FINITE_COLOUR = (190, 208, 232), (31, 119, 180), (140, 86, 75)
VALIDATION_COLOUR, HELD_OUT_COLOUR, LIKENESS_COLOUR = (255, 127, 14), (23, 190, 207), (148, 103, 189)
COLLAPSE_COLOUR, COLLAPSE_SHADE, BEST_COLOUR = (214, 39, 40), (253, 236, 236), (44, 160, 44)

X_END_PADDING = 12  # pixels between the last training step and the right edge of the frame
LOSS_EMA_ALPHA = 0.1  # smoothing of the training-loss line (per reading); the raw readings are drawn faint beneath


@dataclass(frozen=True)
class ChartGeometry:
    """Where things go on the chart; shared by the renderer and the tests."""

    width: int
    height: int
    left: int
    right: int
    loss_top: int
    loss_bottom: int
    likeness_top: int
    likeness_bottom: int
    max_step: int

    def x_of(self, step: float) -> int:
        """Pixel column of a training step (the last step sits a few pixels inside the frame, so its marker shows)."""
        span = max(1, self.max_step)
        inner = self.right - self.left - X_END_PADDING
        return int(round(self.left + inner * min(max(step, 0), span) / span))


def chart_geometry(history: TrainingHistory, width: int = 1000, height: int = 640) -> ChartGeometry:
    left, right = 78, width - 24
    loss_top = 64
    loss_bottom = int(height * 0.60)
    likeness_top = loss_bottom + 62
    likeness_bottom = height - 46
    return ChartGeometry(
        width, height, left, right, loss_top, loss_bottom, likeness_top, likeness_bottom, max(1, history.last_step)
    )


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def _ema_finite(values: Sequence[float], alpha: float) -> list[float | None]:
    out: list[float | None] = []
    current: float | None = None
    for v in values:
        if math.isfinite(v):
            current = v if current is None else alpha * v + (1 - alpha) * current
            out.append(current)
        else:
            out.append(None)
    return out


def _dashed_vline(draw: ImageDraw.ImageDraw, x: int, top: int, bottom: int, colour, width: int, dash: int = 8) -> None:
    y = top
    while y < bottom:
        draw.line([(x, y), (x, min(y + dash, bottom))], fill=colour, width=width)
        y += 2 * dash


def _loss_range(history: TrainingHistory) -> tuple[float, float]:
    values = [v for v in history.losses if math.isfinite(v)]
    vals = [
        v
        for c in history.checkpoints
        for v in (c.validation_loss, c.held_out_loss)
        if v is not None and math.isfinite(v)
    ]
    if not values and not vals:
        return 0.0, 1.0
    lo_candidates, hi_candidates = [], []
    if values:
        lo_candidates.append(float(np.percentile(values, 1)))
        hi_candidates.append(float(np.percentile(values, 99)))  # one spike should not flatten the whole curve
    if vals:
        lo_candidates.append(min(vals))
        hi_candidates.append(max(vals))
    lo, hi = min(lo_candidates), max(hi_candidates)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5 * abs(lo) - 1e-3, hi + 0.5 * abs(hi) + 1e-3
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def _draw_axes(draw, geo: ChartGeometry, top: int, bottom: int, lo: float, hi: float, font, title: str) -> None:
    for tick in _nice_ticks(lo, hi):
        y = bottom - (tick - lo) / (hi - lo) * (bottom - top)
        draw.line([(geo.left, y), (geo.right, y)], fill=GRID_COLOUR, width=1)
        text = _fmt(tick)
        tw = draw.textlength(text, font=font)
        draw.text((geo.left - 6 - tw, y - 7), text, fill=TEXT_COLOUR, font=font)
    for tick in _nice_ticks(0, geo.max_step, 6):
        x = geo.x_of(tick)
        draw.line([(x, top), (x, bottom)], fill=GRID_COLOUR, width=1)
        text = str(int(tick))
        tw = draw.textlength(text, font=font)
        draw.text((x - tw / 2, bottom + 4), text, fill=TEXT_COLOUR, font=font)
    draw.rectangle([geo.left, top, geo.right, bottom], outline=AXIS_COLOUR, width=1)
    label = "training step"
    tw = draw.textlength(label, font=font)
    draw.text(((geo.left + geo.right) / 2 - tw / 2, bottom + 20), label, fill=TEXT_COLOUR, font=font)
    draw.text((geo.left, top - 20), title, fill=TEXT_COLOUR, font=font)


def _legend(draw, x: int, y: int, items: list[tuple[str, Colour]], font) -> None:
    for name, colour in items:
        draw.rectangle([x, y + 4, x + 14, y + 12], fill=colour)
        draw.text((x + 20, y), name, fill=TEXT_COLOUR, font=font)
        x += 28 + int(draw.textlength(name, font=font))


def _draw_series(draw, points: list[tuple[int, float]], colour: Colour) -> None:
    """A per-checkpoint series: a line through its points (when there are two or more) and a dot on each."""
    if len(points) > 1:
        draw.line(points, fill=colour, width=2)
    for x, y in points:
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)


def _draw_headline(draw, geo: ChartGeometry, title: str, collapse: CollapseReport | None) -> None:
    headline = title + (f": collapse began at step {collapse.began_step}" if collapse else ": no collapse detected")
    draw.text((geo.left, 12), headline, fill=COLLAPSE_COLOUR if collapse else TEXT_COLOUR, font=_font(17))


def _shade_collapse(draw, geo: ChartGeometry, panels, collapse: CollapseReport) -> None:
    """Shade the collapsed region of both panels; drawn first, so every line is drawn over it."""
    x0 = geo.x_of(collapse.began_step)
    for top, bottom in panels:
        if x0 < geo.right:
            draw.rectangle([x0, top, geo.right, bottom], fill=COLLAPSE_SHADE)


def _draw_loss_panel(draw, geo: ChartGeometry, history: TrainingHistory, font) -> None:
    """Training loss (raw faint, EMA bold, non-finite readings as marks on the top edge) and the checkpoint losses."""
    lo, hi = _loss_range(history)
    _draw_axes(draw, geo, geo.loss_top, geo.loss_bottom, lo, hi, font, "loss")

    def y_loss(v: float) -> float:
        clamped = min(max(v, lo), hi)
        return geo.loss_bottom - (clamped - lo) / (hi - lo) * (geo.loss_bottom - geo.loss_top)

    raw_points = [(geo.x_of(s), y_loss(v)) for s, v in zip(history.loss_steps, history.losses) if math.isfinite(v)]
    if len(raw_points) > 1:
        draw.line(raw_points, fill=RAW_LOSS_COLOUR, width=1)
    smooth = _ema_finite(history.losses, LOSS_EMA_ALPHA)
    smooth_points = [(geo.x_of(s), y_loss(v)) for s, v in zip(history.loss_steps, smooth) if v is not None]
    if len(smooth_points) > 1:
        draw.line(smooth_points, fill=SMOOTH_LOSS_COLOUR, width=2)
    for s, v in zip(history.loss_steps, history.losses):
        if not math.isfinite(v):
            x = geo.x_of(s)
            draw.polygon(
                [(x - 5, geo.loss_top + 1), (x + 5, geo.loss_top + 1), (x, geo.loss_top + 10)], fill=NON_FINITE_COLOUR
            )
    legend = [("training loss (raw)", RAW_LOSS_COLOUR), ("training loss (smoothed)", SMOOTH_LOSS_COLOUR)]
    for attr, label, colour in (
        ("validation_loss", "validation loss", VALIDATION_COLOUR),
        ("held_out_loss", "held-out validation loss", HELD_OUT_COLOUR),
    ):
        points = [
            (geo.x_of(c.step), y_loss(getattr(c, attr)))
            for c in history.checkpoints
            if getattr(c, attr) is not None and math.isfinite(getattr(c, attr))
        ]
        _draw_series(draw, points, colour)
        if points or attr == "validation_loss":
            legend.append((label, colour))
    if any(not math.isfinite(v) for v in history.losses):
        legend.append(("non-finite loss", NON_FINITE_COLOUR))
    _legend(draw, geo.left + 60, geo.loss_top - 22, legend, font)


def _draw_likeness_panel(draw, geo: ChartGeometry, history: TrainingHistory, font) -> None:
    """Likeness per checkpoint on an axis that always spans [0, 1], or a note when none was recorded."""
    likeness = [
        (c.step, c.likeness) for c in history.checkpoints if c.likeness is not None and math.isfinite(c.likeness)
    ]
    if likeness:
        values = [v for _, v in likeness]
        l_lo = min(0.0, min(values))
        l_hi = max(1.0, max(values))
    else:
        l_lo, l_hi = 0.0, 1.0
    label = "likeness" + (f" ({history.likeness_backend})" if history.likeness_backend else "")
    _draw_axes(draw, geo, geo.likeness_top, geo.likeness_bottom, l_lo, l_hi, font, label)

    def y_like(v: float) -> float:
        return geo.likeness_bottom - (v - l_lo) / (l_hi - l_lo) * (geo.likeness_bottom - geo.likeness_top)

    _draw_series(draw, [(geo.x_of(s), y_like(v)) for s, v in likeness], LIKENESS_COLOUR)
    if not likeness:
        msg = "no likeness score recorded"
        tw = draw.textlength(msg, font=font)
        draw.text(
            ((geo.left + geo.right) / 2 - tw / 2, (geo.likeness_top + geo.likeness_bottom) / 2 - 7),
            msg,
            fill=AXIS_COLOUR,
            font=font,
        )


def _mark_best(draw, geo: ChartGeometry, panels, best: BestChoice, collapse: CollapseReport | None, font) -> None:
    """A green dashed line at the best checkpoint, labelled in the likeness panel clear of the collapse line."""
    x = geo.x_of(best.step)
    for top, bottom in panels:
        _dashed_vline(draw, x, top + 1, bottom - 1, BEST_COLOUR, 2)
    text = f"best: step {best.step}"
    tw = draw.textlength(text, font=font)
    tx = min(x + 5, geo.right - tw - 2)
    if collapse is not None and tx <= geo.x_of(collapse.began_step) + 3 <= tx + tw + 3:
        tx = max(geo.left + 2, x - tw - 5)
    draw.text((tx, geo.likeness_top + 4), text, fill=BEST_COLOUR, font=font)


def _mark_collapse(draw, geo: ChartGeometry, panels, collapse: CollapseReport, font) -> None:
    """A red line where the collapse began, labelled in the loss panel on whichever side has room."""
    x = geo.x_of(collapse.began_step)
    for top, bottom in panels:
        draw.line([(x, top + 1), (x, bottom - 1)], fill=COLLAPSE_COLOUR, width=3)
    text = f"collapse began: step {collapse.began_step}"
    tw = draw.textlength(text, font=font)
    tx = x + 6 if x + 6 + tw < geo.right - 2 else max(geo.left + 2, x - tw - 6)
    draw.text((tx, geo.loss_top + 12), text, fill=COLLAPSE_COLOUR, font=font)


def render_training_report(
    history: TrainingHistory,
    collapse: CollapseReport | None,
    best: BestChoice | None,
    title: str = "Klein LoRA training health",
    width: int = 1000,
    height: int = 640,
) -> Image.Image:
    """Draw the health chart. Pure: no file is written (see :func:`save_training_report`).

    Layers from the back: the collapse shade, the two panels, then the markers, so nothing covers them.
    """
    geo = chart_geometry(history, width, height)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(13)
    panels = [(geo.loss_top, geo.loss_bottom), (geo.likeness_top, geo.likeness_bottom)]
    _draw_headline(draw, geo, title, collapse)
    if collapse is not None:
        _shade_collapse(draw, geo, panels, collapse)
    _draw_loss_panel(draw, geo, history, font)
    _draw_likeness_panel(draw, geo, history, font)
    if best is not None:
        _mark_best(draw, geo, panels, best, collapse, font)
    if collapse is not None:
        _mark_collapse(draw, geo, panels, collapse, font)
    return image


def verdict_text(
    history: TrainingHistory,
    collapse: CollapseReport | None,
    best: BestChoice | None,
    advice: Sequence[str] = (),
    best_copy: str | os.PathLike | None = None,
) -> str:
    """The text verdict shown on the report node and printed by the CLI; ``best_copy`` is the ``_best`` file."""
    lines: list[str] = []
    readings = len(history.losses)
    saved = sum(1 for c in history.checkpoints if c.lora_path)
    if collapse is None:
        lines.append(
            f"Healthy: no collapse signal over {readings} training-loss readings to step {history.last_step} "
            f"and {saved} saved checkpoint{'s' if saved != 1 else ''}."
        )
    else:
        lines.append(
            f"Collapse detected: it began at training step {collapse.began_step} "
            f"(detected at step {collapse.detected_step})."
        )
        for signal in collapse.signals:
            lines.append(f"  - {SIGNAL_DESCRIPTIONS[signal.name]}: {signal.detail}")
        if collapse.last_good_path:
            lines.append(f"Last good checkpoint: step {collapse.last_good_step}, {collapse.last_good_path}")
        else:
            lines.append("No checkpoint was saved before the collapse began.")
    if advice:
        lines.append("What to do, in this order:" if collapse is not None else "Advice:")
        lines.extend(f"  {item}" for item in advice)
    if best is not None:
        copied = f"; copied to {best_copy}" if best_copy else ""
        lines.append(f"Best checkpoint: step {best.step}, {best.path} ({best.reason}){copied}.")
    else:
        lines.append("Best checkpoint: none (no healthy checkpoint was saved).")
    return "\n".join(lines)


def save_training_report(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write the chart as PNG, atomically."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
