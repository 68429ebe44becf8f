"""The flow-matching objective Klein Base is trained with, and the gradient accumulation of one training step.

x0 = cached normalised latents, xt = (1-σ)·x0 + σ·noise, the transformer predicts ``noise - x0`` (MSE).
σ sampling: u ~ N(0, 1), σ = sigmoid(u) (logit-normal: most samples in the middle of the noise range, where
composition and identity are decided), then the exponential shift with μ rising linearly from 0.5 at 256 image
tokens to 1.15 at 4096 (FLUX's training shift; the sampler's larger shift is for inference only). Larger images keep
more signal at a given σ, so the shift moves them towards more noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import TrainingInterrupted
from ..facts import exponential_shift, training_shift_mu
from ..model.latents import pack, predict_velocity
from ..model.lora import adapters_disabled, lora_layers
from ..preset import PRESET


def sample_sigmas(batch: int, image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """σ for ``batch`` samples: logit-normal, then the training shift for this image size."""
    return exponential_shift(torch.sigmoid(torch.randn(batch, generator=generator)), training_shift_mu(image_tokens))


def micro_batch_generator(seed: int, training_step: int, micro: int) -> torch.Generator:
    """Noise, σ and nothing else depend on (seed, step, micro-batch): resume reproduces an unbroken run."""
    digest = hashlib.sha256(f"klein-train:{seed}:{training_step}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """xt = (1-σ)·x0 + σ·noise for latents (B,128,h,w) and σ (B,)."""
    s = sigma.view(len(latents), 1, 1, 1).to(latents.dtype)
    return (1 - s) * latents + s * noise


def flow_matching_loss(
    transformer, latents: torch.Tensor, embeds: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """MSE between the prediction at xt = (1-σ)x0 + σ·noise and the target noise - x0 (latents: B,128,h,w)."""
    _, _, h, w = latents.shape
    param = next(transformer.parameters())
    noisy = pack(noisy_latents(latents, noise, sigma)).to(param.dtype)
    prediction = predict_velocity(transformer, noisy, sigma.to(param.dtype), embeds.to(param.dtype), h, w)
    return torch.nn.functional.mse_loss(prediction.float(), pack(noise - latents).float())


@dataclass(frozen=True)
class EmptyPromptPreservation:
    """What :func:`empty_prompt_preservation_loss` needs at every training step, gathered once per run: the empty
    prompt's embeddings, the term's weight and the LoRA layers to switch off for the base's prediction."""

    embeds: torch.Tensor
    weight: float
    lora_layers: list


def preservation_for(weight: float, empty_embeds: torch.Tensor, transformer) -> EmptyPromptPreservation | None:
    """The run's preservation term, or None when its weight is 0 (off)."""
    return EmptyPromptPreservation(empty_embeds, weight, lora_layers(transformer)) if weight > 0 else None


def empty_prompt_preservation_loss(
    transformer, micro: MicroBatch, preservation: EmptyPromptPreservation
) -> torch.Tensor:
    """MSE between the LoRA's and the base model's prediction for the empty prompt, at the micro-batch's xt.

    Real CFG guides against the empty prompt: v = v("") + g·(v(prompt) - v("")). A LoRA moves v("") too (its weights
    serve every prompt, and caption dropout trains "" on the identity's pictures), and guidance subtracts that part
    of what it learned: on an earlier tiny drawn Klein a LoRA showed 46% of kleinchar's part colours at CFG 4 against
    58% at CFG 1. Holding v("") at the base's keeps the LoRA in the guided difference (92% at CFG 4, 57% at CFG 1)."""
    _, _, h, w = micro.latents.shape
    param = next(transformer.parameters())
    noisy = pack(noisy_latents(micro.latents, micro.noise, micro.sigma)).to(param.dtype)
    sigma = micro.sigma.to(param.dtype)
    embeds = preservation.embeds.to(param.dtype).expand(len(noisy), -1, -1)
    with torch.no_grad(), adapters_disabled(preservation.lora_layers):
        base = predict_velocity(transformer, noisy, sigma, embeds, h, w)
    prediction = predict_velocity(transformer, noisy, sigma, embeds, h, w)
    return torch.nn.functional.mse_loss(prediction.float(), base.float())


@dataclass
class MicroBatch:
    latents: torch.Tensor  # (B,128,h,w) normalised
    embeds: torch.Tensor  # (B,512,3H)
    noise: torch.Tensor
    sigma: torch.Tensor
    weight: float = 1.0  # regularization micro-batches carry the (low) regularization weight
    is_regularization: bool = False


def accumulate_gradients(
    transformer,
    micro_batches: list[MicroBatch],
    should_stop: Callable[[], bool] | None = None,
    grad_accum: int | None = None,
    preservation: EmptyPromptPreservation | None = None,
) -> torch.Tensor:
    """Backward over the micro-batches of one training step, each loss scaled by weight/G (G = ``grad_accum``, by
    default the identity micro-batches given). Returns the mean identity loss (plus the weighted regularization
    loss); the empty-prompt preservation term, when on, adds to the gradients but not to the returned loss (the
    loss the health monitor reads stays the flow-matching loss). A rank of a data-parallel run may have no
    micro-batch at all (its slice of a short batch is empty)."""
    grad_accum = grad_accum or sum(not m.is_regularization for m in micro_batches)
    device = micro_batches[0].latents.device if micro_batches else next(transformer.parameters()).device
    total = torch.zeros((), device=device)
    if should_stop is not None and not micro_batches and should_stop():
        raise TrainingInterrupted("cancelled")
    for micro in micro_batches:
        if should_stop is not None and should_stop():
            raise TrainingInterrupted("cancelled")
        loss = (
            flow_matching_loss(transformer, micro.latents, micro.embeds, micro.noise, micro.sigma)
            * micro.weight
            / grad_accum
        )
        loss.backward()
        total = total + loss.detach()
        if preservation is not None and not micro.is_regularization:
            kept = empty_prompt_preservation_loss(transformer, micro, preservation)
            (kept * preservation.weight * micro.weight / grad_accum).backward()
    return total


VALIDATION_SIGMAS = PRESET.validation_sigmas
VALIDATION_SEED = 20260115


def validation_subset(images: int, limit: int) -> list[int]:
    """At most ``limit`` training images, evenly spaced and the same at every checkpoint: the validation pass costs
    ``limit`` x 4 forwards whatever the dataset's size (every image would make it grow with N per checkpoint, N² per
    run)."""
    if images <= limit:
        return list(range(images))
    return sorted({round(i * (images - 1) / (limit - 1)) for i in range(limit)}) if limit > 1 else [0]


@torch.no_grad()
def validation_losses(
    transformer, latents: Sequence[torch.Tensor], embeds: Sequence[torch.Tensor], indices: Sequence[int] | None = None
) -> torch.Tensor:
    """Per image, the flow-matching loss at the fixed σ values with fixed noise, on the device (no host sync).

    One image at one σ per forward: the pass needs one training forward's activations at most (a batch of the four σ
    held four). The noise of image i is seeded by its index in the dataset, so a subset sees the same noise as the
    full set would."""
    indices = range(len(latents)) if indices is None else indices
    was_training = transformer.training
    transformer.eval()
    losses = []
    for index in indices:
        latent, embed = latents[index].unsqueeze(0), embeds[index]
        generator = torch.Generator().manual_seed(VALIDATION_SEED + index)
        noise = torch.randn(latent.shape, generator=generator).to(latent.device, latent.dtype)
        per_sigma = [
            flow_matching_loss(transformer, latent, embed, noise, torch.full((1,), sigma, device=latent.device))
            for sigma in VALIDATION_SIGMAS
        ]
        losses.append(torch.stack(per_sigma).mean())
    transformer.train(was_training)
    return torch.stack(losses) if losses else torch.zeros(0)


def validation_loss(
    transformer, latents: Sequence[torch.Tensor], embeds: Sequence[torch.Tensor], indices: Sequence[int] | None = None
) -> float:
    """Mean of :func:`validation_losses`: identical inputs at every evaluation, so the numbers are comparable across
    training steps (unlike the noisy training loss). One host sync."""
    losses = validation_losses(transformer, latents, embeds, indices)
    return losses.mean().item() if len(losses) else 0.0
