"""Base-correct sampling for FLUX.2 [klein] Base: true CFG, the empirical-mu sigma grid, flow-match Euler.

Klein Base is undistilled: it needs about 50 sample steps and real classifier-free guidance (CFG about 4). At 20-30
sample steps or with CFG 1 a good LoRA looks weak or noisy, and users retrain for nothing. This module reproduces
``Flux2KleinPipeline`` exactly (same seed convention, same sigma grid, same dtype handling), so a preview here equals
the diffusers pipeline's image for the same seed, and its sigma grid equals ComfyUI's ``Flux2Scheduler``.

It takes pre-computed prompt embeddings, so the trainer can preview with its cached embeddings and no text encoder.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import KleinError
from ..facts import LATENT_CHANNELS, PIXEL_MULTIPLE, exponential_shift, sampling_shift_mu
from ..model.latents import decode_latents, denormalise, pack, predict_velocity, unpack, unpatchify
from ..preset import PRESET

NUM_TRAIN_TIMESTEPS = 1000  # the transformer multiplies the timestep by 1000 inside; the pipeline rounds through it

ProgressCallback = Callable[[int, int], None]  # (sample steps done, sample steps in total)
InterruptCallback = Callable[[], bool]  # True (or raising) stops the sampling


class PreviewError(KleinError):
    """A preview setting (size, sample steps, prompt, checkpoint selection) cannot be used."""


class SamplingInterrupted(KleinError):
    """The user cancelled a preview between two sample steps; the base weights have been restored."""


def base_sigmas(sample_steps: int, image_tokens: int) -> torch.Tensor:
    """The Klein Base sigma grid, ``sample_steps + 1`` values from 1 down to 0 (fp32).

    ``linspace(1, 1/N, N)`` shifted by ``sigma' = e^mu / (e^mu + 1/sigma - 1)``, then a final 0. The arithmetic
    is done in fp32 like the diffusers scheduler, so the grid is the pipeline's to the last bit.
    """
    if sample_steps < 1:
        raise PreviewError(
            f"sample_steps must be at least 1 (got {sample_steps}); Klein Base wants about {PRESET.sample_steps}"
        )
    unshifted = torch.linspace(1.0, 1.0 / sample_steps, sample_steps, dtype=torch.float64).to(torch.float32)
    shifted = exponential_shift(unshifted, sampling_shift_mu(image_tokens, sample_steps))
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float32)])


def sample_warnings(sample_steps: int, cfg: float, is_distilled: bool = False) -> list[str]:
    """Warnings for Base preview settings that make a LoRA look weak: too few sample steps, or no real CFG."""
    if is_distilled:
        return []
    advice = (
        f"Klein Base is undistilled and needs about {PRESET.sample_steps} sample steps and CFG about {PRESET.cfg:g}; "
        "an under-sampled preview makes a good LoRA look weak or noisy, so check these settings before retraining."
    )
    warnings = []
    if sample_steps < PRESET.min_base_sample_steps:
        warnings.append(f"sample_steps {sample_steps} is below {PRESET.min_base_sample_steps}. {advice}")
    if cfg <= PRESET.min_base_cfg:
        warnings.append(f"cfg {cfg:g} is at or below {PRESET.min_base_cfg:g}, so there is no real guidance. {advice}")
    return warnings


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < PIXEL_MULTIPLE or value % PIXEL_MULTIPLE:
            raise PreviewError(
                f"{name} {value} is not a positive multiple of {PIXEL_MULTIPLE} (Klein's VAE /8 then 2x2 patches); "
                f"use e.g. {max(PIXEL_MULTIPLE, value - value % PIXEL_MULTIPLE)}"
            )


def initial_noise(batch: int, width: int, height: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The pipeline's starting noise: ``randn((B,128,H/16,W/16))`` from a CPU generator seeded with ``seed``.

    Drawn on the CPU so the same seed gives the same image on every device (and matches ComfyUI's CPU noise).
    """
    generator = torch.Generator("cpu").manual_seed(int(seed))
    shape = (batch, LATENT_CHANNELS, height // PIXEL_MULTIPLE, width // PIXEL_MULTIPLE)
    return torch.randn(shape, generator=generator, dtype=dtype)


def _as_batch(embeds: torch.Tensor) -> torch.Tensor:
    return embeds.unsqueeze(0) if embeds.ndim == 2 else embeds  # cached embeds are stored per prompt as (512, 3H)


def _negative_batch(negative_embeds: torch.Tensor | None, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The empty prompt's embeddings, one per prompt, on the prompts' device and dtype (true CFG needs them)."""
    if negative_embeds is None:
        raise PreviewError('true CFG needs the empty-prompt negative embeddings (encode "" with the text encoder)')
    negative = _as_batch(negative_embeds).to(prompt_embeds.device, prompt_embeds.dtype)
    return negative.expand(prompt_embeds.shape[0], -1, -1)


@torch.no_grad()
def denoise_base(
    transformer,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    width: int,
    height: int,
    sample_steps: int = PRESET.sample_steps,
    cfg: float = PRESET.cfg,
    seed: int = PRESET.preview_seed,
    batched_cfg: bool = True,
    is_distilled: bool = False,
    progress: ProgressCallback | None = None,
    interrupt: InterruptCallback | None = None,
) -> torch.Tensor:
    """Run the flow-match Euler loop; returns normalised patchified latents (B,128,H/16,W/16).

    True CFG (``neg + cfg*(cond - neg)``) runs when ``cfg > 1`` on a Base model, as in the pipeline; with
    ``batched_cfg`` cond and uncond share one forward of batch 2B (same math, fewer kernel launches).

    ``prompt_embeds`` is (B,512,3H) or one cached (512,3H); ``negative_embeds`` is the ``""`` prompt's embeddings.
    ``progress(done, sample_steps)`` runs after each sample step; ``interrupt()`` is checked before each one and
    stops sampling with :class:`SamplingInterrupted` when it returns True (it may also raise its own exception).
    """
    check_size(width, height)
    prompt_embeds = _as_batch(prompt_embeds)
    batch = prompt_embeds.shape[0]
    device = next(transformer.parameters()).device
    model_dtype = next(transformer.parameters()).dtype
    prompt_embeds = prompt_embeds.to(device)
    use_cfg = cfg > 1.0 and not is_distilled
    if use_cfg:
        negative_embeds = _negative_batch(negative_embeds, prompt_embeds)

    h, w = height // PIXEL_MULTIPLE, width // PIXEL_MULTIPLE
    # Latents start in the embeddings' dtype, like the pipeline; after the first step they carry the model's dtype.
    latents = pack(initial_noise(batch, width, height, seed, prompt_embeds.dtype).to(device))
    sigmas = base_sigmas(sample_steps, h * w).to(device)
    timesteps = sigmas[:-1] * NUM_TRAIN_TIMESTEPS  # fp32, as the scheduler stores them
    if use_cfg and batched_cfg:
        both_embeds = torch.cat([prompt_embeds, negative_embeds])

    def predict(x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return predict_velocity(transformer, x, timestep, embeds, h, w)

    for i in range(sample_steps):
        if interrupt is not None and interrupt():
            raise SamplingInterrupted(f"preview interrupted at sample step {i}/{sample_steps}")
        # The pipeline casts sigma*1000 to the latents' dtype before dividing: identical in fp32, and bit-exact in bf16.
        timestep = timesteps[i].expand(batch).to(latents.dtype) / NUM_TRAIN_TIMESTEPS
        x = latents.to(model_dtype)
        if use_cfg and batched_cfg:
            both = predict(torch.cat([x, x]), torch.cat([timestep, timestep]), both_embeds)
            cond, uncond = both.chunk(2)
            velocity = uncond + cfg * (cond - uncond)
        else:
            velocity = predict(x, timestep, prompt_embeds)
            if use_cfg:
                uncond = predict(x, timestep, negative_embeds)
                velocity = uncond + cfg * (velocity - uncond)
        # Euler in fp32, stored back in the prediction's dtype (as the diffusers scheduler does).
        latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * velocity).to(velocity.dtype)
        if progress is not None:
            progress(i + 1, sample_steps)
    return unpack(latents, h, w)


@torch.no_grad()
def latents_to_images(vae, normalised: torch.Tensor) -> torch.Tensor:
    """Normalised patchified latents -> images (B,3,H,W) in [0,1], fp32 on the CPU."""
    pixels = decode_latents(vae, normalised)
    return (pixels.float() / 2 + 0.5).clamp(0, 1).cpu()


def vae_latents(vae, normalised: torch.Tensor) -> torch.Tensor:
    """Normalised patchified latents -> the VAE's (B,32,H/8,W/8) latents (the pipeline's ``output_type="latent"``)."""
    return unpatchify(denormalise(vae, normalised))


def sample_base(transformer, vae, *denoise_args, **denoise_options) -> torch.Tensor:
    """Sample Klein Base from prompt embeddings; returns images (B,3,H,W) in [0,1] on the CPU.

    Takes :func:`denoise_base`'s arguments after the ``vae`` (same order, same defaults) and decodes its latents.
    """
    return latents_to_images(vae, denoise_base(transformer, *denoise_args, **denoise_options))
