"""Checkpoint x prompt preview grids for Klein Base LoRAs, at one seed, with a no-LoRA control row.

Rows are LoRA checkpoints (the control row, step 0, has no LoRA; an optional strength sweep adds rows for one
checkpoint), columns are prompts, and every cell uses the same seed, so differences come from the LoRA alone. Each
LoRA is merged into the base weights for its row and the exact original weights are put back afterwards (also on
error or cancel), so one loaded transformer serves every row, including the trainer's in-memory one.
"""

from __future__ import annotations

import gc
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open

from ..atomic import atomic_write, atomic_write_json
from ..data.captions import substitute_trigger
from ..health.advice import diagnose_weak_lora
from ..model.loading import default_device, load_text_encoder, load_transformer, load_vae, model_dtype
from ..model.lora import LoraPatcher, LoraWeights, read_lora_file
from ..model.text import encode_prompts
from ..preset import PRESET
from .sampling import PreviewError, check_size, sample_base, sample_warnings

CONTROL_STEP = 0  # the no-LoRA control row is labelled training step 0
DEFAULT_STRENGTH_SWEEP = (0.6, 0.8, 1.0, 1.2)  # a suggestion for the UI and the docs; no sweep unless asked
GRID_FILE = "grid.png"
LISTING_FILE = "preview.json"
LABEL_LINES = 2
GAP = 2  # pixels between cells in the grid


@dataclass(frozen=True)
class PreviewCheckpoint:
    """One LoRA to preview. ``weights`` None is the no-LoRA control."""

    training_step: int | None  # None for a LoRA file that does not say (a LoRA from another trainer)
    name: str
    weights: LoraWeights | None = None

    @property
    def is_control(self) -> bool:
        return self.weights is None


CONTROL = PreviewCheckpoint(CONTROL_STEP, "no LoRA (control)", None)


@dataclass(frozen=True)
class PreviewSettings:
    """How every cell is sampled: Base-correct defaults from the preset (50 sample steps, CFG 4).

    Its fields are ``sampling.denoise_base``'s sampling arguments, by name: the grid passes them on as they are.
    """

    width: int = PRESET.resolution
    height: int = PRESET.resolution
    sample_steps: int = PRESET.sample_steps
    cfg: float = PRESET.cfg
    seed: int = PRESET.preview_seed
    batched_cfg: bool = True
    is_distilled: bool = False

    def warnings(self) -> list[str]:
        return sample_warnings(self.sample_steps, self.cfg, self.is_distilled)


@dataclass(frozen=True)
class PreviewRow:
    checkpoint: PreviewCheckpoint
    strength: float

    @property
    def label(self) -> str:
        if self.checkpoint.is_control:
            return f"step {CONTROL_STEP}: no LoRA (control)"
        where = (
            f"step {self.checkpoint.training_step}"
            if self.checkpoint.training_step is not None
            else self.checkpoint.name
        )
        return f"{where}, strength {self.strength:g}"


@dataclass
class PreviewCell:
    row: int
    column: int
    checkpoint_step: int | None
    checkpoint: str
    strength: float
    prompt: str
    seed: int
    pixels: torch.Tensor  # (3, H, W) float in [0, 1], unlabelled (for metrics and for ComfyUI's IMAGE)
    file: str | None = None

    @property
    def image(self) -> Image.Image:
        return to_pil(self.pixels)

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "row": self.row,
            "column": self.column,
            "checkpoint_step": self.checkpoint_step,
            "checkpoint": self.checkpoint,
            "strength": self.strength,
            "prompt": self.prompt,
            "seed": self.seed,
        }


@dataclass
class PreviewResult:
    grid: Image.Image  # labelled
    cells: list[PreviewCell]
    rows: list[PreviewRow]
    prompts: list[str]
    settings: PreviewSettings
    warnings: list[str] = field(default_factory=list)
    weak_lora_advice: list[str] = field(default_factory=list)  # for a trained run: what to do if it looks weak
    grid_file: Path | None = None
    listing_file: Path | None = None

    def cells_tensor(self) -> torch.Tensor:
        """All cells as one (N, H, W, 3) float batch in [0, 1] (ComfyUI's IMAGE layout), row by row."""
        return torch.stack([c.pixels.permute(1, 2, 0) for c in self.cells])

    def grid_tensor(self) -> torch.Tensor:
        """The labelled grid as a (1, H, W, 3) float batch in [0, 1]."""
        return torch.from_numpy(np.asarray(self.grid, dtype=np.float32) / 255.0).unsqueeze(0)

    def listing(self) -> dict:
        s = self.settings
        return {
            "grid": self.grid_file.name if self.grid_file else None,
            "seed": s.seed,
            "sample_steps": s.sample_steps,
            "cfg": s.cfg,
            "width": s.width,
            "height": s.height,
            "prompts": self.prompts,
            "rows": [r.label for r in self.rows],
            "warnings": self.warnings,
            "cells": [c.as_dict() for c in self.cells],
        }


# --- choosing what to render ------------------------------------------------------------------------------------
def checkpoint_from_file(path: str | Path) -> PreviewCheckpoint:
    """A LoRA file in any supported key format; its training step from our metadata or a ``_stepNNN`` name."""
    path = Path(path)
    weights = read_lora_file(path)
    return PreviewCheckpoint(_training_step_of(path), path.name, weights)


def _training_step_of(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as fh:
            value = (fh.metadata() or {}).get("training_steps")
        if value is not None:
            return int(value)
    except (OSError, ValueError):
        pass
    match = re.search(r"_step(\d+)$", path.stem)
    return int(match.group(1)) if match else None


def lora_trigger_word(path: str | Path) -> str | None:
    """The trigger word a LoRA file records in its metadata (ours does), else None."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("trigger_word") or None
    except (OSError, ValueError):
        return None


def checkpoints_from_run(run) -> list[PreviewCheckpoint]:
    """The trainer's in-memory checkpoints (``KLEIN_LORA_RUN``), oldest first; nothing is re-read from disk."""
    ordered = sorted(run.checkpoints, key=lambda c: c.training_step)
    return [PreviewCheckpoint(c.training_step, c.path.name, c.weights) for c in ordered]


@dataclass(frozen=True)
class CheckpointSpec:
    """A parsed checkpoint selection: every one, none, the last N, or the given training steps."""

    kind: str  # "all", "none", "last" or "steps"
    count: int = 0
    steps: tuple[int, ...] = ()


def parse_checkpoint_spec(spec: str | None) -> CheckpointSpec:
    """``"all"``, ``"none"``, ``"last"``, ``"last N"`` or a comma list of training steps such as ``"500, 1000"``."""
    text = (spec or "all").strip().lower()
    if text in ("all", "none"):
        return CheckpointSpec(text)
    match = re.fullmatch(r"last\s*(\d+)?", text)
    if match:
        count = int(match.group(1) or 1)
        if count < 1:
            raise PreviewError(f"checkpoints {spec!r}: 'last N' needs N >= 1")
        return CheckpointSpec("last", count=count)
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    bad = [t for t in tokens if not t.isdigit()]
    if bad or not tokens:
        raise PreviewError(
            f"checkpoints {spec!r}: {bad[0]!r} is not a training step; use 'all', 'last N', 'none' or e.g. '500, 1000'"
            if bad
            else f"checkpoints {spec!r}: use 'all', 'last N', 'none' or training steps such as '500, 1000'"
        )
    return CheckpointSpec("steps", steps=tuple(int(t) for t in tokens))


def select_checkpoints(checkpoints: Sequence[PreviewCheckpoint], spec: str) -> list[PreviewCheckpoint]:
    """Pick checkpoints by ``"all"``, ``"last"``, ``"last N"``, ``"none"`` or a comma list of training steps."""
    parsed = parse_checkpoint_spec(spec)
    if parsed.kind == "all":
        return list(checkpoints)
    if parsed.kind == "none":
        return []
    if parsed.kind == "last":
        return list(checkpoints)[-parsed.count :]
    by_step = {c.training_step: c for c in checkpoints}
    available = ", ".join(str(c.training_step) for c in checkpoints) or "none"
    missing = [s for s in parsed.steps if s not in by_step]
    if missing:
        raise PreviewError(
            f"checkpoints {spec!r}: no checkpoint at training step {missing[0]} (available: {available})"
        )
    return [by_step[s] for s in parsed.steps]


def parse_strengths(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """``"0.6, 0.8 1.0"`` -> (0.6, 0.8, 1.0); empty means no strength sweep."""
    if text is None:
        return ()
    tokens = (
        [str(t) for t in text] if not isinstance(text, str) else [t for t in re.split(r"[,\s]+", text.strip()) if t]
    )
    values = []
    for token in tokens:
        try:
            value = float(token)
        except ValueError:
            raise PreviewError(f"LoRA strength {token!r} is not a number; use e.g. '0.6, 0.8, 1.0, 1.2'") from None
        if not math.isfinite(value):
            raise PreviewError(f"LoRA strength {token!r} is not finite")
        values.append(value)
    return tuple(values)


def plan_rows(
    checkpoints: Sequence[PreviewCheckpoint],
    strengths: Sequence[float] = (),
    sweep_checkpoint: PreviewCheckpoint | None = None,
    include_control: bool = True,
) -> list[PreviewRow]:
    """The control row, then every checkpoint at strength 1, then the strength sweep of one checkpoint (the last
    one unless given); a (checkpoint, strength) pair that already has a row is not rendered twice."""
    rows = [PreviewRow(CONTROL, 0.0)] if include_control else []
    rows += [PreviewRow(c, 1.0) for c in checkpoints]
    if strengths and checkpoints:
        target = sweep_checkpoint or checkpoints[-1]
        for strength in strengths:
            row = PreviewRow(target, float(strength))
            if not any(r.checkpoint is row.checkpoint and r.strength == row.strength for r in rows):
                rows.append(row)
    return rows


# --- rendering --------------------------------------------------------------------------------------------------
def render_preview_grid(
    transformer,
    vae,
    prompts: Sequence[str],
    prompt_embeds: Sequence[torch.Tensor],
    negative_embeds: torch.Tensor | None,
    rows: Sequence[PreviewRow],
    settings: PreviewSettings = PreviewSettings(),
    out_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    interrupt: Callable[[], bool] | None = None,
    on_cell: Callable[[PreviewCell], None] | None = None,
) -> PreviewResult:
    """Render every row x prompt cell at ``settings.seed``; save PNGs, the grid and a JSON listing to ``out_dir``.

    ``progress(done, total)`` counts sample steps over all cells. ``interrupt`` is checked before every sample
    step. The transformer's base weights are restored exactly after each row, whatever happens.
    """
    if not prompts:
        raise PreviewError("no preview prompts given")
    if len(prompts) != len(prompt_embeds):
        raise PreviewError(f"{len(prompts)} prompts but {len(prompt_embeds)} prompt embeddings")
    if not rows:
        raise PreviewError("nothing to preview: no checkpoints selected and no control row")
    check_size(settings.width, settings.height)
    total = len(rows) * len(prompts) * settings.sample_steps
    done_before = 0
    cells: list[PreviewCell] = []
    patcher = LoraPatcher(transformer)
    for r, row in enumerate(rows):
        with patcher.applied(row.checkpoint.weights, row.strength):
            for c, (prompt, embeds) in enumerate(zip(prompts, prompt_embeds)):

                def step_progress(done: int, _steps: int, base: int = done_before) -> None:
                    if progress is not None:
                        progress(base + done, total)

                pixels = sample_base(
                    transformer,
                    vae,
                    embeds,
                    negative_embeds,
                    **asdict(settings),
                    progress=step_progress,
                    interrupt=interrupt,
                )[0]
                done_before += settings.sample_steps
                cell = PreviewCell(
                    r, c, row.checkpoint.training_step, row.checkpoint.name, row.strength, prompt, settings.seed, pixels
                )
                cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
    result = PreviewResult(
        grid=compose_grid(cells, rows, len(prompts)),
        cells=cells,
        rows=list(rows),
        prompts=list(prompts),
        settings=settings,
        warnings=settings.warnings(),
    )
    if out_dir is not None:
        save_preview(result, Path(out_dir))
    return result


def to_pil(pixels: torch.Tensor) -> Image.Image:
    array = (pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def _font(cell_width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(9, cell_width // 40))  # scales with the cell (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """Truncate ``text`` with '...' to fit ``width`` pixels."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")  # the bitmap fallback font is latin-1 only
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def compose_grid(cells: Sequence[PreviewCell], rows: Sequence[PreviewRow], columns: int) -> Image.Image:
    """Cells in a rows x columns grid, each under a label strip: the checkpoint step and strength, then the prompt."""
    height, width = cells[0].pixels.shape[1:]
    font = _font(width)
    _, top, _, bottom = font.getbbox("Ag")
    line = bottom - top + 2
    strip = LABEL_LINES * line + 4
    grid = Image.new(
        "RGB", (columns * width + (columns - 1) * GAP, len(rows) * (strip + height) + (len(rows) - 1) * GAP), "white"
    )
    draw = ImageDraw.Draw(grid)
    for cell in cells:
        x = cell.column * (width + GAP)
        y = cell.row * (strip + height + GAP)
        for i, text in enumerate((rows[cell.row].label, cell.prompt)):
            draw.text((x + 2, y + 2 + i * line - top), _fit(text, font, width - 4), fill="black", font=font)
        grid.paste(cell.image, (x, y + strip))
    return grid


def _slug(cell: PreviewCell) -> str:
    if cell.checkpoint_step == CONTROL_STEP and cell.strength == 0.0:
        return "control"
    where = (
        f"step{cell.checkpoint_step:06d}"
        if cell.checkpoint_step is not None
        else re.sub(r"[^A-Za-z0-9]+", "-", Path(cell.checkpoint).stem)[:40]
    )
    return f"{where}_x{cell.strength:g}"


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_preview(result: PreviewResult, out_dir: Path) -> None:
    """Write each cell, the labelled grid and ``preview.json`` (file, checkpoint step, strength, prompt, seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for cell in result.cells:
        name = f"r{cell.row:02d}_c{cell.column:02d}_{_slug(cell)}.png"
        _save_png(cell.image, out_dir / name)
        cell.file = name
    result.grid_file = out_dir / GRID_FILE
    _save_png(result.grid, result.grid_file)
    result.listing_file = out_dir / LISTING_FILE
    atomic_write_json(result.listing_file, result.listing())


# --- standalone: model files plus LoRA files ---------------------------------------------------------------------
@dataclass
class LoadedForPreview:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    prompt_embeds: list[torch.Tensor]
    negative_embeds: torch.Tensor


def load_for_preview(resolved, prompts: Sequence[str], device: str | torch.device | None = None) -> LoadedForPreview:
    """Encode ``prompts`` and ``""`` with the text encoder, free it, then load the transformer and the VAE.

    The text encoder (Qwen3-8B for 9B, ~15 GiB) and the transformer are never resident together.
    """
    device = str(device or default_device())
    dtype = model_dtype(device)
    text_encoder, tokenizer = load_text_encoder(resolved, dtype=dtype, device=device)
    prompt_embeds = list(encode_prompts(text_encoder, tokenizer, list(prompts)))
    negative = encode_prompts(text_encoder, tokenizer, [""])[0]
    del text_encoder, tokenizer
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    transformer = load_transformer(resolved, dtype=dtype, device=device)
    vae = load_vae(resolved, dtype=torch.float32, device=device)
    return LoadedForPreview(transformer, vae, prompt_embeds, negative)


def split_prompts(text: str) -> list[str]:
    """One prompt per non-empty line (the node's multiline input)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def substitute_prompts(prompts: Sequence[str], trigger: str | None, lora_files: Sequence[str | Path] = ()) -> list[str]:
    """Replace ``[trigger]`` by ``trigger``, or by the trigger word a LoRA file records; an error if neither exists."""
    word = (trigger or "").strip() or next((w for w in map(lora_trigger_word, lora_files) if w), None)
    out = []
    for prompt in prompts:
        if substitute_trigger(prompt, "") != prompt:  # holds the placeholder (any case)
            if not word:
                raise PreviewError(
                    f"prompt {prompt!r} uses {PRESET.trigger_placeholder} but no trigger word was given and no LoRA "
                    "file records one"
                )
            prompt = substitute_trigger(prompt, word)
        out.append(prompt)
    return out


# --- the trainer's in-memory run ---------------------------------------------------------------------------------
def run_prompt_embeds(run, prompts: Sequence[str]) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    """Look up the embeddings the trainer cached for ``prompts`` (``[trigger]`` substituted); no text encoder.

    No prompts means every preview prompt the run has. A prompt the run did not encode is an error that lists the
    ones it did.
    """
    cached = run.preview_embeds
    if "" not in cached:
        raise PreviewError("the training run holds no empty-prompt embeddings for CFG; retrain with this version")
    wanted = [p for p in prompts if p.strip()] or [p for p in cached if p != ""]
    if not wanted:
        raise PreviewError("no preview prompts: give some here, or set preview prompts on the trainer")
    names, embeds = [], []
    for prompt in wanted:
        text = substitute_trigger(prompt, run.trigger)
        key = text if text in cached else prompt if prompt in cached else None
        if key is None:
            known = "; ".join(repr(substitute_trigger(p, run.trigger)) for p in cached if p != "") or "none"
            raise PreviewError(
                f"prompt {text!r} was not encoded during training (the text encoder is not loaded for previews of a "
                f"run). Add it to the trainer's preview prompts and re-run, or use one of: {known}"
            )
        names.append(text)
        embeds.append(cached[key])
    return names, embeds, cached[""]


def preview_run(
    run,
    prompts: Sequence[str] = (),
    settings: PreviewSettings | None = None,
    checkpoints: str = "all",
    strengths: Sequence[float] = (),
    include_control: bool = True,
    out_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    interrupt: Callable[[], bool] | None = None,
    on_cell: Callable[[PreviewCell], None] | None = None,
) -> PreviewResult:
    """Preview a trainer's in-memory run (``KLEIN_LORA_RUN``) with its own transformer, VAE and cached embeddings.

    ``settings`` width/height 0 (or no settings) means the run's training resolution. The result carries the
    weak-LoRA diagnosis for this run and these settings: the preview settings first, then the loss trend.
    """
    settings = settings or PreviewSettings(width=0, height=0)
    settings = replace(
        settings,
        width=settings.width or run.resolution,
        height=settings.height or run.resolution,
    )
    names, embeds, negative = run_prompt_embeds(run, prompts)
    chosen = select_checkpoints(checkpoints_from_run(run), checkpoints)
    rows = plan_rows(chosen, strengths, include_control=include_control)
    result = render_preview_grid(
        run.transformer,
        run.vae,
        names,
        embeds,
        negative,
        rows,
        settings,
        out_dir,
        progress=progress,
        interrupt=interrupt,
        on_cell=on_cell,
    )
    losses = run.history.losses
    advice = diagnose_weak_lora(losses, settings.sample_steps, settings.cfg, is_base=not settings.is_distilled)
    return replace(result, weak_lora_advice=advice)
