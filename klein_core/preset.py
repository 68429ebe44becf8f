"""The Klein 9B Base starter preset: the one source of truth for node defaults, CLI defaults and docs."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class StarterPreset:
    """Starting values for a character/identity LoRA on FLUX.2 [klein] Base 9B (4B uses the same)."""

    batch_size: int = 1
    grad_accum: int = 1  # 2-4 only to save VRAM; the planner lowers training steps in proportion
    learning_rate: float = 1e-4
    unstable_learning_rate: float = 5e-5  # first advice when a run collapses or the loss goes non-finite
    rank: int = 16  # 32 only when the run is stable and underfitting
    stable_underfit_rank: int = 32
    alpha: int = 16  # alpha = rank: the LoRA scale alpha/rank is 1.0
    resolution: int = 1024
    optional_resolutions: tuple[int, ...] = (768,)
    trigger_placeholder: str = "[trigger]"
    default_caption: str = "photo of [trigger]"
    caption_dropout: float = 0.05
    regularization_weight: float = (
        0.1  # loss weight of the optional class-image set: low, so it anchors without diluting
    )
    target_repeats: float = 100.0
    extension_repeats: float = 20.0  # a continued run's default top-up of an under-trained LoRA (repeats per image)
    save_every: int = 250  # training steps between LoRA checkpoints
    fresh_optimizer_warmup_steps: int = (
        20  # LR warmup when a LoRA continues without its optimizer state (Adam's moments restart at zero)
    )
    output_name: str = "klein_lora"  # the LoRA file name stem
    sample_steps: int = 50  # denoising steps of a preview, not training steps
    cfg: float = 4.0  # real classifier-free guidance: Base is undistilled
    preview_seed: int = 0
    min_base_sample_steps: int = 30  # below this a Base preview is under-sampled (warning)
    min_base_cfg: float = 1.5  # at or below this a Base preview has no real guidance (warning)
    # Checkpoint health work, bounded so it stays under a tenth of the training compute (the fit-check audit counts
    # it): the fixed-noise validation runs on at most this many training images (x 4 sigma), and the health preview
    # renders at most this many pixels a side (50 sample steps, CFG 4, Base-correct; at 512 px a preview costs a
    # third of one at 1024, and the likeness scorer reads faces at 512 px anyway).
    validation_images: int = 8
    validation_sigmas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)  # the fixed σ of each validation image
    health_preview_resolution: int = 512
    # When a health preview at every checkpoint would push the checkpoint work above this share of the training
    # between checkpoints (small images, no gradient checkpointing, a short save_every), previews render at every
    # K-th checkpoint instead, never fewer than ``min_health_previews`` in a run (collapse detection reads a trend).
    max_checkpoint_work_fraction: float = 0.10
    min_health_previews: int = 4

    def as_dict(self) -> dict:
        return asdict(self)


PRESET = StarterPreset()
