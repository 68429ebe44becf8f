"""``klein-lora demo``: the whole pipeline on a tiny random Klein, on a CPU, in a few minutes.

1. make the tiny Klein (a diffusers folder) and the sample dataset under the output folder (reused when present);
2. plan the dose with the repeats planner;
3. train with the starter preset, scaled to the tiny model (:class:`DemoScale` says what changes and why);
4. render a Base-correct checkpoint grid (no-LoRA control row first; 50 sample steps, CFG 4, one seed);
5. measure that the LoRA learned: its preview is closer to the training images than the control's (same seed);
6. say where the LoRA, the grid, the health report and the run manifest are.

It runs the same code as a real run on Klein 9B; only the model is tiny and random. Its images are therefore not
pictures of the character: the tiny VAE is random too, so the proof of learning is measured in its latent space
(:func:`nearest_training_distance`), where the training images live.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..atomic import atomic_write_bytes
from ..data.buckets import fit_to_bucket
from ..data.images import is_image_file, load_image_rgb, pixels_from_image
from ..data.spec import DatasetSpec
from ..model.latents import encode_images
from ..preset import PRESET

TINY_FOLDER = "tiny-klein"
DATASET_FOLDER = "sample-dataset"
RUN_FOLDER = "run"
PREVIEW_FOLDER = "preview"
CACHE_FOLDER = "cache"
READY_MARKER = ".complete"  # written after the tiny model is fully on disk, so a half-written one is rebuilt
DEMO_TRIGGER = "kleinchar"


# --- the learning metric (shared with tests/test_learning.py) ----------------------------------------------------
def training_reference_latents(vae, image_paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """The training images as a ``size`` x ``size`` preview would hold them: centre-cropped to the square (as aspect
    buckets crop), encoded with the same VAE, normalised and patchified. Returns (N, 128, size/16, size/16)."""
    pixels = torch.stack([pixels_from_image(fit_to_bucket(load_image_rgb(p), (size, size))) for p in image_paths])
    return encode_images(vae, pixels).float().cpu()


def nearest_training_distance(latents: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each preview latent (B, 128, h, w): the RMS distance per latent element to its NEAREST training latent.

    Normalised latents have about unit variance, so pure noise sits at about 1 and a memorised training image at 0.
    Nearest (not mean) distance: a LoRA that learned the character reproduces one of its images, not their average.
    """
    diff = latents.float().cpu()[:, None] - references.float().cpu()[None]
    return diff.pow(2).mean(dim=(2, 3, 4)).sqrt().min(dim=1).values


def dataset_images(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p))


# --- the demo -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoScale:
    """The starter preset scaled to the tiny random model. The dose (target repeats, batch, grad accum), the rank,
    the caption rules and the Base preview settings are the preset's own values; only these change, each because the
    tiny model is not Klein 9B:

    - ``images``: 4 generated images instead of a 20-60 photo set, so the planned 100 repeats per image are
      400 training steps (about 0.1 s each on 2 CPU cores);
    - ``resolution``: 128 px instead of 1024: the tiny model's cost is its 512 text tokens, and its random VAE makes
      no picture at any size, so more pixels would only cost time; 128 keeps the grid's labels readable;
    - ``learning_rate``: 1e-2 instead of 1e-4: Klein 9B already denoises, and a LoRA only adds a small identity delta
      to it; the tiny model is random, so its LoRA must learn the denoising itself, and 1e-4 would barely move it
      in 400 training steps. On a real Klein keep the preset's 1e-4 (5e-5 when unstable);
    - ``health_previews`` off: a health preview per checkpoint costs as much as a grid cell, and the random VAE draws
      no picture whose statistics or likeness mean anything; the verdict still uses the fixed-noise validation loss.

    The whole demo takes about 75 s on 2 idle CPU cores (measured), most of it training.
    """

    images: int = 4
    image_size: int = 192  # long side of the generated images; the short side stays >= 128 px (no "tiny image" warning)
    resolution: int = 128
    learning_rate: float = 1e-2
    rank: int = PRESET.rank
    target_repeats: float = PRESET.target_repeats
    batch_size: int = PRESET.batch_size
    grad_accum: int = PRESET.grad_accum
    caption_dropout: float = PRESET.caption_dropout
    step_checkpoints: int = 2  # checkpoints in the grid besides the control row: save every S / 2 training steps
    health_previews: bool = False
    prompt: str = PRESET.default_caption  # "photo of [trigger]"
    sample_steps: int = PRESET.sample_steps  # 50: the tiny model is cheap enough for Base-correct previews
    cfg: float = PRESET.cfg
    seed: int = PRESET.preview_seed
    training_seed: int = 0

    def changes(self) -> list[str]:
        """What differs from the starter preset, in words (printed by the demo)."""
        from ..health.advice import format_learning_rate

        return [
            f"{self.images} generated images (a real set has 20-60 photos)",
            f"resolution {self.resolution} px (preset {PRESET.resolution})",
            f"LR {format_learning_rate(self.learning_rate)} (preset {format_learning_rate(PRESET.learning_rate)}: "
            "a random model's LoRA must learn denoising itself, a real Klein's only the identity)",
        ] + ([] if self.health_previews else ["no health previews (the random VAE draws nothing to judge; the verdict "
                                               "uses the validation loss)"])


@dataclass
class DemoResult:
    out_dir: Path
    model_dir: Path
    dataset_dir: Path
    run_dir: Path
    final_lora: Path
    best_lora: Path | None
    grid: Path
    preview_listing: Path
    health_report: Path | None
    manifest: Path
    plan: dict
    verdict: str
    control_distance: float
    lora_distance: float
    preview_warnings: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def distance_ratio(self) -> float:
        return self.lora_distance / self.control_distance

    def as_dict(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["distance_ratio"] = self.distance_ratio
        return out


def _ensure_tiny_model(folder: Path, log: Callable[[str], None]) -> Path:
    from .tiny import make_tiny

    diffusers_dir = folder / "diffusers"
    if (folder / READY_MARKER).exists() and (diffusers_dir / "model_index.json").exists():
        log(f"  reusing the tiny Klein in {diffusers_dir}")
        return diffusers_dir
    make_tiny(folder, fmt="diffusers", seed=0)
    atomic_write_bytes(folder / READY_MARKER, b"ok\n")
    log(f"  made a tiny random-initialised Klein Base (real diffusers classes) in {diffusers_dir}")
    return diffusers_dir


def _ensure_sample_dataset(folder: Path, scale: DemoScale, log: Callable[[str], None]) -> Path:
    from .sample_data import make_sample_dataset, sample_file_names

    expected = [folder / name for pair in sample_file_names(scale.images) for name in pair]
    if all(p.exists() for p in expected):
        log(f"  reusing {scale.images} sample images in {folder}")
        return folder
    make_sample_dataset(folder, count=scale.images, seed=0, size=scale.image_size)
    log(f"  made {scale.images} images of a drawn character (red hat, yellow scarf, blue body) with captions in {folder}")
    return folder


def run_demo(
    out_dir: str | Path = "klein-demo",
    scale: DemoScale = DemoScale(),
    log: Callable[[str], None] = print,
    on_training_step: Callable[[dict], None] | None = None,
    on_sample_step: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Run the demo into ``out_dir`` (created; the tiny model and the dataset are reused when already there)."""
    from ..model.loading import resolve_model
    from ..model.lora import LoraPatcher
    from ..preview.grid import PreviewSettings, preview_run
    from ..preview.sampling import denoise_base
    from ..train.config import TrainCallbacks, TrainConfig
    from ..train.loop import train
    from ..train.preflight import MANIFEST_FILE
    from ..model.loading import default_device
    from ..train.planner import plan

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> str:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now
        return f"({seconds[name]:.0f} s)"

    log(f"Klein LoRA demo in {out} on {default_device()}: the real pipeline on a tiny random Klein Base")
    log("[1/5] model and data")
    model_dir = _ensure_tiny_model(out / TINY_FOLDER, log)
    dataset_dir = _ensure_sample_dataset(out / DATASET_FOLDER, scale, log)
    log(f"  {lap('model_and_data')}")

    the_plan = plan(len(dataset_images(dataset_dir)), scale.target_repeats, scale.batch_size, scale.grad_accum)
    save_every = max(1, math.ceil(the_plan.training_steps / scale.step_checkpoints))
    log("[2/5] plan (repeats planner: S = ceil(N*R/(B*G)), repeats_per_image = S*B*G/N)")
    log(f"  N={the_plan.images} images, R={scale.target_repeats:g}, B={the_plan.batch_size}, G={the_plan.grad_accum} "
        f"-> S={the_plan.training_steps} training steps")
    log(f"  repeats per image {the_plan.repeats_per_image:.1f} -> band: {the_plan.band}; epochs {the_plan.epochs:.1f}")

    log("[3/5] train: the starter preset, scaled to the tiny model")
    log(f"  kept from the preset: batch {scale.batch_size}, grad accum {scale.grad_accum}, rank {scale.rank} "
        f"(alpha = rank), caption dropout {scale.caption_dropout:g}, target {scale.target_repeats:g} repeats per image")
    log(f"  scaled to the tiny model: {'; '.join(scale.changes())}")
    spec = DatasetSpec(
        folder=str(dataset_dir), trigger=DEMO_TRIGGER, default_caption=PRESET.default_caption,
        caption_dropout=scale.caption_dropout, resolutions=(scale.resolution,),
    )
    config = TrainConfig(
        output_name=DEMO_TRIGGER, target_repeats=scale.target_repeats, batch_size=scale.batch_size,
        grad_accum=scale.grad_accum, learning_rate=scale.learning_rate, rank=scale.rank, seed=scale.training_seed,
        save_every=save_every, health_previews=scale.health_previews,
    )
    run = train(
        resolve_model(model_dir), spec, config, out / RUN_FOLDER,
        callbacks=TrainCallbacks(on_step=on_training_step, log=lambda m: log(f"  {m}".replace("\n", "\n  "))),
        preview_prompts=(scale.prompt,), cache_dir=out / CACHE_FOLDER,
    )
    log(f"  {lap('train')}")

    settings = PreviewSettings(
        width=scale.resolution, height=scale.resolution, sample_steps=scale.sample_steps, cfg=scale.cfg, seed=scale.seed,
    )  # training runs only on Base (a distilled model is refused), so the previews are Base previews
    log(f"[4/5] preview grid: rows = no-LoRA control (step 0) + {len(run.checkpoints)} checkpoints, "
        f"{settings.sample_steps} sample steps, CFG {settings.cfg:g}, seed {settings.seed} for every cell")
    for warning in settings.warnings():
        log(f"  warning: {warning}")
    result = preview_run(run, [scale.prompt], settings, out_dir=out / PREVIEW_FOLDER, progress=on_sample_step)
    log(f"  {lap('preview')}")

    log("[5/5] did it learn? Distance to the nearest training image in the VAE's latent space "
        "(noise is about 1, a training image 0), grid control vs final checkpoint, same seed")
    references = training_reference_latents(run.vae, dataset_images(dataset_dir), scale.resolution)
    prompt = result.prompts[0]
    embeds, negative = run.preview_embeds[prompt], run.preview_embeds[""]
    final_weights = run.checkpoints[-1].weights
    patcher = LoraPatcher(run.transformer)
    distances = []
    for weights in (None, final_weights):
        with patcher.applied(weights):
            latents = denoise_base(run.transformer, embeds, negative, scale.resolution, scale.resolution,
                                   scale.sample_steps, scale.cfg, scale.seed,
                                   progress=on_sample_step)
        distances.append(float(nearest_training_distance(latents, references)[0]))
    control_distance, lora_distance = distances
    log(f"  control {control_distance:.3f}, final LoRA {lora_distance:.3f}: "
        f"{100 * (1 - lora_distance / control_distance):.0f}% closer to the training images. About the most this "
        "tiny model allows: its output head is random and frozen (tests/test_learning.py checks the margin)")
    log(f"  {lap('learning_check')}")

    seconds["total"] = round(sum(seconds.values()), 1)
    health = run.health
    return DemoResult(
        out_dir=out, model_dir=model_dir, dataset_dir=dataset_dir, run_dir=run.run_dir, final_lora=run.final_lora,
        best_lora=health.best_lora if health else None, grid=result.grid_file, preview_listing=result.listing_file,
        health_report=health.report_path if health else None, manifest=run.run_dir / MANIFEST_FILE, plan=the_plan.as_dict(),
        verdict=health.verdict if health else "", control_distance=control_distance, lora_distance=lora_distance,
        preview_warnings=list(result.warnings), seconds=seconds,
    )
