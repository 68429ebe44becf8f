"""FLUX.2 [klein] facts, each defined once: the shapes of the released models, the text length and layers, the latent
grid and the timestep shifts of training and sampling. Everything else in the pack imports them from here.

Sources: the diffusers classes (``Flux2Transformer2DModel``, ``Flux2KleinPipeline``, ``AutoencoderKLFlux2``) and the
FLUX.2 reference code; a value that differs from FLUX.2-dev says so, because copying the dev value is a known trap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# --- text -------------------------------------------------------------------------------------------------------
TEXT_TOKENS = 512  # every prompt is padded to 512 tokens; the transformer sees all of them, unmasked
TEXT_ENCODER_LAYERS = (9, 18, 27)  # Qwen3 hidden states stacked per token; (10, 20, 30) is a FLUX.2-dev value

# --- latents ----------------------------------------------------------------------------------------------------
PIXEL_MULTIPLE = 16  # image sides are multiples of 16: the VAE divides by 8, the 2x2 patchify by 2 more
LATENT_CHANNELS = 128  # patchified latent channels: 32 VAE channels x 2x2


def image_tokens(width: int, height: int) -> int:
    """Latent tokens of a width x height image: one per 16x16 pixel patch (1024² -> 4096)."""
    return (height // PIXEL_MULTIPLE) * (width // PIXEL_MULTIPLE)


# --- transformer shapes -----------------------------------------------------------------------------------------
HEAD_DIM = 128  # every attention head is 128 wide: a transformer's hidden size is its heads x 128


def transformer_config(
    hidden_size: int,
    num_layers: int,
    num_single_layers: int,
    joint_attention_dim: int,
    timestep_channels: int = 256,
    mlp_ratio: float = 3.0,
) -> dict:
    """The diffusers ``Flux2Transformer2DModel`` config of a Klein transformer of these widths and block counts.

    What every Klein shares, the released sizes and the tiny test model alike, is written here once: patch size 1
    on the 128 latent channels, 128-wide heads, rope axes 32x4 at theta 2000, and no guidance embedding (the
    guidance-distilled FLUX.2-dev has one). ComfyUI recognises a Flux2 transformer by these.
    """
    return dict(
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=hidden_size // HEAD_DIM,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=timestep_channels,
        mlp_ratio=mlp_ratio,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=False,
    )


# The released text encoders (Qwen3 configs): what the fit-check audit builds for the text-encoder phase. Both have
# 36 layers of 32 query and 8 key/value heads 128 wide over the same vocabulary; they differ in width.
_QWEN3_SHARED = dict(
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936
)
QWEN3_CONFIGS = {
    "Qwen3-8B": dict(_QWEN3_SHARED, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
    "Qwen3-4B": dict(_QWEN3_SHARED, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class KleinShape:
    """One released Klein size: its transformer's block counts and widths, and the text encoder that feeds it."""

    name: str
    hidden_size: int  # heads x 128
    num_layers: int  # double-stream blocks
    num_single_layers: int
    text_encoder: str  # a key of QWEN3_CONFIGS

    @property
    def text_encoder_hidden_size(self) -> int:
        return QWEN3_CONFIGS[self.text_encoder]["hidden_size"]

    @property
    def joint_attention_dim(self) -> int:
        """The transformer's text input width: three stacked text-encoder layers."""
        return len(TEXT_ENCODER_LAYERS) * self.text_encoder_hidden_size

    @property
    def transformer_config(self) -> dict:
        """The released transformer's diffusers config (the fit-check audit builds its fake model from it)."""
        return transformer_config(self.hidden_size, self.num_layers, self.num_single_layers, self.joint_attention_dim)


KLEIN_9B = KleinShape("9B", 4096, 8, 24, "Qwen3-8B")
KLEIN_4B = KleinShape("4B", 3072, 5, 20, "Qwen3-4B")
KLEIN_SHAPES = {shape.name: shape for shape in (KLEIN_9B, KLEIN_4B)}

# --- timestep shifts --------------------------------------------------------------------------------------------
# Training: FLUX's dynamic shift, mu rising linearly from 0.5 at 256 image tokens to 1.15 at 4096 (BFL trained FLUX.2
# with it; the larger sampling shift below is for inference only).
TRAIN_SHIFT_BASE, TRAIN_SHIFT_MAX, TRAIN_SHIFT_BASE_TOKENS, TRAIN_SHIFT_MAX_TOKENS = 0.5, 1.15, 256, 4096

# Sampling: the empirical mu fit of the FLUX.2 reference code, a line in the step count between a fit at 10 and at 200
# sample steps, each linear in the image token count; above 4300 tokens only the 200-step fit is used.
_MU_10_SLOPE, _MU_10_INTERCEPT = 8.73809524e-5, 1.89833333
_MU_200_SLOPE, _MU_200_INTERCEPT = 0.00016927, 0.45666666
_MU_LARGE_IMAGE_TOKENS = 4300


def training_shift_mu(tokens: int) -> float:
    """The training shift's mu for an image of ``tokens`` latent tokens."""
    slope = (TRAIN_SHIFT_MAX - TRAIN_SHIFT_BASE) / (TRAIN_SHIFT_MAX_TOKENS - TRAIN_SHIFT_BASE_TOKENS)
    return TRAIN_SHIFT_BASE + slope * (tokens - TRAIN_SHIFT_BASE_TOKENS)


def sampling_shift_mu(tokens: int, sample_steps: int) -> float:
    """The sampler's mu for an image of ``tokens`` latent tokens sampled in ``sample_steps`` steps."""
    if tokens > _MU_LARGE_IMAGE_TOKENS:
        return float(_MU_200_SLOPE * tokens + _MU_200_INTERCEPT)
    mu_at_10 = _MU_10_SLOPE * tokens + _MU_10_INTERCEPT
    mu_at_200 = _MU_200_SLOPE * tokens + _MU_200_INTERCEPT
    return float(mu_at_10 + (sample_steps - 10) * (mu_at_200 - mu_at_10) / 190.0)


def exponential_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """``sigma' = e^mu / (e^mu + 1/sigma - 1)``: the one shift training and sampling share (with their own mu).

    fp32 tensors on both sides of every division: torch turns ``scalar / tensor`` into a reciprocal times the
    scalar, which is 1 ulp off the diffusers scheduler's plain division.
    """
    shift = torch.tensor(math.exp(mu), dtype=sigma.dtype)
    one = torch.tensor(1.0, dtype=sigma.dtype)
    return shift / (shift + (one / sigma - one))
