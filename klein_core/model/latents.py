"""Klein latents: VAE encode, 2x2 patchify to 128 channels, batch-norm normalise, pack to tokens; and back.

Shapes: pixels (B,3,H,W) in [-1,1] -> VAE (B,32,H/8,W/8) -> patchified (B,128,H/16,W/16), channel c*4+dy*2+dx
-> normalised with the VAE's ``bn`` running stats -> packed tokens (B, H/16*W/16, 128), token index h*W+w.
"""

from __future__ import annotations

import torch

from .text import text_ids


def patchify(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    x = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a (height, width) latent grid (in /16 units)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def normalise(vae, patchified: torch.Tensor) -> torch.Tensor:
    mean, std = _bn_stats(vae, patchified)
    return (patchified - mean) / std


def denormalise(vae, normalised: torch.Tensor) -> torch.Tensor:
    mean, std = _bn_stats(vae, normalised)
    return normalised * std + mean


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [-1,1] -> normalised patchified latents (B,128,H/16,W/16). Uses the distribution's mode."""
    param = next(vae.parameters())
    latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
    return normalise(vae, patchify(latents))


@torch.no_grad()
def decode_latents(vae, normalised: torch.Tensor) -> torch.Tensor:
    """Normalised patchified latents (B,128,h,w) -> pixels (B,3,16h,16w) in [-1,1]."""
    param = next(vae.parameters())
    latents = unpatchify(denormalise(vae, normalised.to(param.device, param.dtype)))
    return vae.decode(latents, return_dict=False)[0]


def image_ids(batch: int, height: int, width: int, device="cpu") -> torch.Tensor:
    """Image position ids (0, h, w, 0) in token order h*W+w, shape (B, h*w, 4). Built by stacking, not by writes
    into a zeros tensor, so it also runs on fake CUDA tensors (the fit-check audit) on a CPU-only torch."""
    hh, ww = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    zeros = torch.zeros(height * width, dtype=torch.long, device=device)
    ids = torch.stack([zeros, hh.reshape(-1), ww.reshape(-1), zeros], dim=-1)
    return ids.unsqueeze(0).expand(batch, -1, -1)


def predict_velocity(
    transformer, tokens: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """One call of the Klein Base transformer, as training and sampling both make it: packed image tokens of a
    (height, width) latent grid (in /16 units), σ in [0, 1] as the timestep and the prompt embeddings; no guidance
    embedding (Base has none, so CFG is a second call). Returns the predicted velocity ``noise - x0``, packed."""
    batch = tokens.shape[0]
    return transformer(
        hidden_states=tokens,
        encoder_hidden_states=embeds,
        timestep=timestep,
        img_ids=image_ids(batch, height, width, tokens.device),
        txt_ids=text_ids(batch, embeds.shape[1], tokens.device),
        guidance=None,
        return_dict=False,
    )[0]
