"""The checkpoint's validation pass: bounded in cost and memory, identical at every checkpoint."""

from __future__ import annotations

import torch

from klein_core.train.objective import validation_loss, validation_losses, validation_subset


def test_validation_reads_at_most_eight_evenly_spaced_training_images():
    assert validation_subset(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert (
        validation_subset(50, 8)[0] == 0 and validation_subset(50, 8)[-1] == 49 and len(validation_subset(50, 8)) == 8
    )
    assert validation_subset(5, 8) == [0, 1, 2, 3, 4]  # a small set is read whole


def test_a_subset_sees_the_noise_each_image_has_in_the_full_set(tiny_diffusers):
    from klein_core.model.loading import load_transformer, resolve_model

    transformer = load_transformer(resolve_model(tiny_diffusers))
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(128, 4, 4, generator=generator) for _ in range(10)]
    joint = transformer.config.joint_attention_dim
    embeds = [torch.randn(1, 512, joint, generator=generator) for _ in range(10)]
    every = validation_losses(transformer, latents, embeds)
    subset = validation_subset(10, 4)
    assert torch.allclose(validation_losses(transformer, latents, embeds, subset), every[subset])
    assert abs(validation_loss(transformer, latents, embeds, subset) - every[subset].mean().item()) < 1e-6
    assert validation_loss(transformer, latents, embeds, subset) == validation_loss(
        transformer, latents, embeds, subset
    )
