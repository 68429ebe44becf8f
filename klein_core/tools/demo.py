"""``klein-lora demo``: the whole pipeline on the pre-trained tiny Klein that draws, on a CPU, in about a minute.

1. take the pre-trained tiny Klein Base that ships in ``klein_core/assets/tiny_klein_drawn`` (it draws the generated
   world of :mod:`.world`) and make the identity's 4 pictures under the output folder (reused when present);
2. plan the dose with the repeats planner;
3. train with the starter preset scaled to the tiny model, health previews on (:class:`DemoScale` says what changes);
4. render a Base-correct checkpoint grid (no-LoRA control row first; 50 sample steps, CFG 4, one seed);
5. measure that the LoRA learned, per checkpoint and on several seeds: the part-colour likeness (the share of
   kleinchar's hat, scarf and body colours the part-colour reader finds) and the pixel distance to the nearest
   training picture, against the no-LoRA control;
6. say where the LoRA, the grid, the health report and the run manifest are.

It runs the same code as a real run on Klein 9B; only the model is tiny. "photo of kleinchar" without the LoRA draws
some character of the world (the base never saw kleinchar's colours together, nor its star); with it, kleinchar.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data.buckets import fit_to_bucket
from ..data.images import is_image_file, load_image_rgb, pixels_from_image
from ..data.spec import DatasetSpec
from ..fields import from_attributes
from ..model.latents import encode_images
from ..preset import PRESET

DATASET_FOLDER = "identity-dataset"
RUN_FOLDER = "run"
PREVIEW_FOLDER = "preview"
CACHE_FOLDER = "cache"
DEMO_TRIGGER = "kleinchar"
PART_COLOUR_LABEL = (
    "part-colour likeness (share of kleinchar's hat, scarf and body colours the part-colour reader finds)"
)


# --- the learning metrics (shared with the tests) ------------------------------------------------------------------
def training_reference_latents(vae, image_paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """The training images as a ``size`` x ``size`` preview would hold them: centre-cropped to the square (as aspect
    buckets crop), encoded with the same VAE, normalised and patchified. Returns (N, 128, size/16, size/16)."""
    return encode_images(vae, training_reference_pixels(image_paths, size) * 2 - 1).float().cpu()


def training_reference_pixels(image_paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """The training images centre-cropped to ``size`` x ``size`` (as aspect buckets crop): (N, 3, size, size) in
    [0, 1]."""
    return (
        torch.stack([pixels_from_image(fit_to_bucket(load_image_rgb(p), (size, size))) for p in image_paths]) / 2 + 0.5
    )


def nearest_training_distance(previews: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each preview (B, C, H, W): the RMS distance per element to its NEAREST training reference (N, C, H, W).

    In latents (normalised, about unit variance) noise sits near 1 and a memorised training image at 0; in pixels
    in [0, 1] an unrelated picture of the world sits at about 0.3. Nearest (not mean) distance: a LoRA that learned
    the character draws something like one of its images, not their average.
    """
    diff = previews.float().cpu()[:, None] - references.float().cpu()[None]
    return diff.pow(2).mean(dim=(2, 3, 4)).sqrt().min(dim=1).values


def dataset_images(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p))


# --- the demo -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoScale:
    """The starter preset scaled to the tiny pre-trained model. The dose (target repeats, batch, grad accum), the
    rank, the caption rules, the health previews and the Base preview settings are the preset's own values; only
    these change, each because the tiny model is not Klein 9B:

    - ``images``: 4 generated pictures of kleinchar instead of a 20-60 photo set, so the planned 100 repeats per
      image are 400 training steps;
    - ``resolution``: 64 px instead of 1024: the tiny Klein was pre-trained on 64 px pictures of its world;
    - ``learning_rate``: 1e-3 instead of 1e-4: the tiny transformer is 1.0 M parameters with one attention head,
      and 400 training steps at 1e-4 move its rank-16 LoRA too little; on a real Klein keep the preset's 1e-4.
    - ``empty_prompt_preservation``: 1 instead of off: the tiny model's LoRA moves its empty-prompt prediction
      almost as much as its trigger's, so CFG 4 (which guides against the empty prompt) showed less of kleinchar
      than CFG 1 (46% vs 58% of its part colours, on an earlier base); held at the base's, CFG 4 shows more
      (92% vs 57% there; 75% vs 35% at 200 training steps on the shipped base)
      (:func:`klein_core.train.objective.empty_prompt_preservation_loss`).

    Measured: done in 20 s on 2 idle cores (27.7 s wall with the imports), most of it training; the README has the
    figures.
    """

    images: int = 4
    image_size: int = 128  # the generated pictures are 128 px (no "tiny image" warning), trained at 64
    resolution: int = 64
    learning_rate: float = 1e-3
    empty_prompt_preservation: float = 1.0
    rank: int = PRESET.rank
    target_repeats: float = PRESET.target_repeats
    batch_size: int = PRESET.batch_size
    grad_accum: int = PRESET.grad_accum
    caption_dropout: float = PRESET.caption_dropout
    step_checkpoints: int = 4  # checkpoints in the grid besides the control row: save every S / 4 training steps
    health_previews: bool = True
    prompt: str = PRESET.default_caption  # "photo of [trigger]"
    sample_steps: int = PRESET.sample_steps  # 50: the tiny model is cheap enough for Base-correct previews
    cfg: float = PRESET.cfg
    seed: int = PRESET.preview_seed
    score_seeds: int = 8  # the learning check scores this many previews (one batch, one noise per element)
    training_seed: int = 0

    def changes(self) -> list[str]:
        """What differs from the starter preset, in words (printed by the demo)."""
        from ..health.advice import format_learning_rate

        return [
            f"{self.images} generated pictures (a real set has 20-60 photos)",
            f"resolution {self.resolution} px (preset {PRESET.resolution}: the tiny Klein knows 64 px pictures)",
            f"LR {format_learning_rate(self.learning_rate)} (preset {format_learning_rate(PRESET.learning_rate)}: "
            "the tiny transformer's LoRA needs more in 400 training steps; keep the preset's on a real Klein)",
            f"empty-prompt preservation {self.empty_prompt_preservation:g} (preset off: without it this model's "
            "LoRA moves the empty prompt as much as its trigger, and CFG 4 guides part of it away)",
        ]


@dataclass
class CheckpointScore:
    """The learning check of one grid row: the no-LoRA control (training step 0) or a checkpoint."""

    training_step: int
    part_colour: float  # mean over the scored previews, 0 to 1
    pixel_distance: float  # mean over the scored previews of the distance to the nearest training picture
    likeness: float | None  # the health monitor's likeness at this checkpoint (its backend is named in the result)


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
    scores: list[CheckpointScore]
    likeness_backend: str | None
    preview_warnings: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def control_distance(self) -> float:
        return self.scores[0].pixel_distance

    @property
    def lora_distance(self) -> float:
        return self.scores[-1].pixel_distance

    @property
    def distance_ratio(self) -> float:
        return self.lora_distance / self.control_distance

    def as_dict(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out.update(
            control_distance=self.control_distance,
            lora_distance=self.lora_distance,
            distance_ratio=self.distance_ratio,
            part_colour_label=PART_COLOUR_LABEL,
        )
        return out


def _ensure_identity_dataset(folder: Path, scale: DemoScale, log: Callable[[str], None]) -> Path:
    from .world import IDENTITY, identity_file_names, make_identity_dataset

    expected = [folder / name for pair in identity_file_names(scale.images) for name in pair]
    if all(p.exists() for p in expected):
        log(f"  reusing {scale.images} pictures of {DEMO_TRIGGER} in {folder}")
        return folder
    make_identity_dataset(folder, count=scale.images, seed=0, size=scale.image_size)
    log(
        f"  made {scale.images} pictures of {DEMO_TRIGGER} ({IDENTITY.hat} hat, {IDENTITY.scarf} scarf, "
        f"{IDENTITY.body} body with a white star: a look the base never saw) with captions in {folder}"
    )
    return folder


def _log_model(model_dir: Path, log: Callable[[str], None]) -> None:
    import json

    from .pretrain import MANIFEST_FILE

    manifest = json.loads((model_dir.parent / MANIFEST_FILE).read_text())
    accuracy = manifest["colour_accuracy"]
    log(
        f"  the pre-trained tiny Klein Base in {model_dir} (real diffusers classes; draws hat/scarf/body characters: "
        f"VAE PSNR {manifest['psnr_db']:.1f} dB, {100 * accuracy['all_parts']:.0f}% of samples with all three "
        f"prompted part colours at {accuracy['sample_steps']} sample steps, CFG {accuracy['cfg']:g})"
    )


def _plan(dataset_dir: Path, scale: DemoScale, log: Callable[[str], None]):
    from ..train.planner import plan

    the_plan = plan(len(dataset_images(dataset_dir)), scale.target_repeats, scale.batch_size, scale.grad_accum)
    log("[2/5] plan (repeats planner: S = ceil(N*R/(B*G)), repeats_per_image = S*B*G/N)")
    log(
        f"  N={the_plan.images} images, R={scale.target_repeats:g}, B={the_plan.batch_size}, G={the_plan.grad_accum} "
        f"-> S={the_plan.training_steps} training steps"
    )
    log(f"  repeats per image {the_plan.repeats_per_image:.1f} -> band: {the_plan.band}; epochs {the_plan.epochs:.1f}")
    return the_plan


def _train(
    model_dir: Path,
    dataset_dir: Path,
    scale: DemoScale,
    training_steps: int,
    out: Path,
    log: Callable[[str], None],
    on_training_step: Callable[[dict], None] | None,
):
    from ..model.loading import resolve_model
    from ..train.config import TrainCallbacks, TrainConfig
    from ..train.loop import train

    log("[3/5] train: the starter preset, scaled to the tiny model")
    log(
        f"  kept from the preset: batch {scale.batch_size}, grad accum {scale.grad_accum}, rank {scale.rank} "
        f"(alpha = rank), caption dropout {scale.caption_dropout:g}, "
        f"target {scale.target_repeats:g} repeats per image, "
        f"health previews {'on' if scale.health_previews else 'off'}"
    )
    log(f"  scaled to the tiny model: {'; '.join(scale.changes())}")
    spec = DatasetSpec(
        folder=str(dataset_dir),
        trigger=DEMO_TRIGGER,
        default_caption=PRESET.default_caption,
        caption_dropout=scale.caption_dropout,
        resolutions=(scale.resolution,),
    )
    config = TrainConfig(
        output_name=DEMO_TRIGGER,
        target_repeats=scale.target_repeats,
        batch_size=scale.batch_size,
        grad_accum=scale.grad_accum,
        learning_rate=scale.learning_rate,
        empty_prompt_preservation=scale.empty_prompt_preservation,
        rank=scale.rank,
        seed=scale.training_seed,
        save_every=max(1, math.ceil(training_steps / scale.step_checkpoints)),
        health_previews=scale.health_previews,
    )
    return train(
        resolve_model(model_dir),
        spec,
        config,
        out / RUN_FOLDER,
        callbacks=TrainCallbacks(on_step=on_training_step, log=lambda m: log(f"  {m}".replace("\n", "\n  "))),
        preview_prompts=(scale.prompt,),
        cache_dir=out / CACHE_FOLDER,
    )


def _grid(run, scale: DemoScale, out: Path, log: Callable[[str], None], on_sample_step):
    from ..preview.grid import PreviewSettings, preview_run

    # training runs only on Base (a distilled model is refused), so the previews are Base previews
    settings = from_attributes(PreviewSettings, scale, width=scale.resolution, height=scale.resolution)
    log(
        f"[4/5] preview grid: rows = no-LoRA control (step 0) + {len(run.checkpoints)} checkpoints, "
        f"{settings.sample_steps} sample steps, CFG {settings.cfg:g}, seed {settings.seed} for every cell"
    )
    for warning in settings.warnings():
        log(f"  warning: {warning}")
    return preview_run(run, [scale.prompt], settings, out_dir=out / PREVIEW_FOLDER, progress=on_sample_step)


def render_checkpoint(
    run, weights, scale: DemoScale, sample_steps: int | None = None, cfg: float | None = None, progress=None
) -> torch.Tensor:
    """``scale.score_seeds`` previews of the demo prompt with ``weights`` (None: the control): (B, 3, H, W) in
    [0, 1]."""
    from ..model.lora import LoraPatcher
    from ..preview.sampling import denoise_base, latents_to_images

    prompt = scale.prompt.replace(PRESET.trigger_placeholder, run.trigger)
    embeds = run.preview_embeds[prompt].expand(scale.score_seeds, -1, -1)
    with LoraPatcher(run.transformer).applied(weights):
        latents = denoise_base(
            run.transformer,
            embeds,
            run.preview_embeds[""],
            scale.resolution,
            scale.resolution,
            sample_steps or scale.sample_steps,
            scale.cfg if cfg is None else cfg,
            scale.seed,
            progress=progress,
        )
    return latents_to_images(run.vae, latents)


def score_checkpoints(run, reader, references: torch.Tensor, scale: DemoScale, progress=None) -> list[CheckpointScore]:
    """The learning check of every grid row, on ``scale.score_seeds`` previews each (same seeds in every row)."""
    from .colour_reader import part_colour_score
    from .world import IDENTITY

    likeness = {record.step: record.likeness for record in run.history.checkpoints}
    rows = [(0, None)] + [(c.training_step, c.weights) for c in run.checkpoints]
    scores = []
    for step, weights in rows:
        previews = render_checkpoint(run, weights, scale, progress=progress)
        scores.append(
            CheckpointScore(
                training_step=step,
                part_colour=part_colour_score(reader, previews, IDENTITY),
                pixel_distance=float(nearest_training_distance(previews, references).mean()),
                likeness=likeness.get(step),
            )
        )
    return scores


def _log_scores(scores: list[CheckpointScore], likeness_backend: str | None, log: Callable[[str], None]) -> None:
    control = scores[0]
    log(f"  {'row':<22} part-colour  pixel distance  likeness ({likeness_backend or 'no health previews'})")
    for score in scores:
        name = "step 0: no LoRA" if score is control else f"step {score.training_step}"
        likeness = "-" if score.likeness is None else f"{score.likeness:.3f}"
        log(f"  {name:<22} {100 * score.part_colour:>9.0f}%  {score.pixel_distance:>14.3f}  {likeness}")
    final = scores[-1]
    log(
        f"  final LoRA vs control: part colours {100 * control.part_colour:.0f}% -> {100 * final.part_colour:.0f}%, "
        f"{100 * (1 - final.pixel_distance / control.pixel_distance):.0f}% closer to the training pictures in pixels"
    )


def run_demo(
    out_dir: str | Path = "klein-demo",
    scale: DemoScale = DemoScale(),
    log: Callable[[str], None] = print,
    on_training_step: Callable[[dict], None] | None = None,
    on_sample_step: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Run the demo into ``out_dir`` (created; the identity pictures are reused when already there)."""
    from ..model.loading import default_device
    from ..train.preflight import MANIFEST_FILE
    from .colour_reader import load_reader
    from .pretrain import READER_FILE, shipped_tiny

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - clock[0], 1)
        clock[0] = now
        log(f"  ({seconds[name]:.0f} s)")

    log(f"Klein LoRA demo in {out} on {default_device()}: the real pipeline on a tiny pre-trained Klein Base")
    log("[1/5] model and data")
    model_dir = shipped_tiny() / "diffusers"
    _log_model(model_dir, log)
    dataset_dir = _ensure_identity_dataset(out / DATASET_FOLDER, scale, log)
    lap("model_and_data")
    the_plan = _plan(dataset_dir, scale, log)
    run = _train(model_dir, dataset_dir, scale, the_plan.training_steps, out, log, on_training_step)
    lap("train")
    result = _grid(run, scale, out, log, on_sample_step)
    lap("preview")
    log(
        f"[5/5] did it learn? {scale.score_seeds} previews per row (seeds {scale.seed}+), {PART_COLOUR_LABEL}; "
        "RMS pixel distance to the nearest training picture"
    )
    references = training_reference_pixels(dataset_images(dataset_dir), scale.resolution)
    scores = score_checkpoints(run, load_reader(shipped_tiny() / READER_FILE), references, scale)
    _log_scores(scores, run.history.likeness_backend, log)
    lap("learning_check")
    seconds["total"] = round(sum(seconds.values()), 1)
    health = run.health
    return DemoResult(
        out_dir=out,
        model_dir=model_dir,
        dataset_dir=dataset_dir,
        run_dir=run.run_dir,
        final_lora=run.final_lora,
        best_lora=health.best_lora if health else None,
        grid=result.grid_file,
        preview_listing=result.listing_file,
        health_report=health.report_path if health else None,
        manifest=run.run_dir / MANIFEST_FILE,
        plan=the_plan.as_dict(),
        verdict=health.verdict if health else "",
        scores=scores,
        likeness_backend=run.history.likeness_backend,
        preview_warnings=list(result.warnings),
        seconds=seconds,
    )
