"""While a LoRA trains, the single blocks' output projection keeps the two parts of its input (the attention output and
the fused projection, both kept by the frozen model's own backward) instead of their concatenation: the same loss
and gradients as the plain LoRA, and that much less memory (3.4 GiB at 9B, 1024 px)."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttnProcessor

from klein_core.model import lora as lora_io
from klein_core.model.single_block_lora import PartsLoraParallelProcessor, use_parts_processor
from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG
from klein_core.tools.traffic import SavedActivations
from klein_core.train.objective import flow_matching_loss
from harness.tiny_lora import adapted_tiny_transformer

IMAGE_TOKENS, TEXT_TOKENS = 16, 8


def _training_step(transformer: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Loss, LoRA gradients and saved activation bytes of one flow-matching step on a fixed batch."""
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 128, 4, 4, generator=generator)
    embeds = torch.randn(2, TEXT_TOKENS, TINY_TRANSFORMER_CONFIG["joint_attention_dim"], generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    params = lora_io.lora_parameters(transformer)
    for param in params:
        param.grad = None
    with SavedActivations(transformer).counting() as saved:
        loss = flow_matching_loss(transformer, latents, embeds, noise, torch.tensor([0.3, 0.8]))
        saved_bytes = saved.bytes
    loss.backward()
    return loss.detach(), [param.grad.clone() for param in params], saved_bytes


def test_while_a_lora_trains_the_single_blocks_read_the_parts_and_learn_exactly_what_the_plain_lora_does():
    transformer = adapted_tiny_transformer()
    assert all(isinstance(b.attn.processor, PartsLoraParallelProcessor) for b in transformer.single_transformer_blocks)
    parts_loss, parts_grads, _ = _training_step(transformer)
    use_parts_processor(transformer, attached=False)  # diffusers' processor: the LoRA sees the concatenation
    plain_loss, plain_grads, _ = _training_step(transformer)
    assert torch.equal(parts_loss, plain_loss)
    for parts, plain in zip(parts_grads, plain_grads, strict=True):
        torch.testing.assert_close(parts, plain, rtol=1e-5, atol=1e-7)
    assert any(grad.abs().max() > 0 for grad in parts_grads)


def test_the_lora_keeps_no_concatenated_output_projection_input():
    transformer = adapted_tiny_transformer()
    *_, parts_saved = _training_step(transformer)
    use_parts_processor(transformer, attached=False)
    *_, plain_saved = _training_step(transformer)
    attention = transformer.single_transformer_blocks[0].attn
    joined_width = attention.inner_dim + attention.mlp_hidden_dim  # what to_out reads: 16384 at 9B
    joined_bytes = 2 * (IMAGE_TOKENS + TEXT_TOKENS) * joined_width * 4  # batch 2, fp32
    assert plain_saved - parts_saved == len(transformer.single_transformer_blocks) * joined_bytes


def test_without_autograd_and_after_the_lora_is_removed_the_single_blocks_are_diffusers_own():
    transformer = adapted_tiny_transformer()
    hidden = torch.randn(1, IMAGE_TOKENS + TEXT_TOKENS, 128)
    block_attention = transformer.single_transformer_blocks[0].attn
    with torch.no_grad():  # a health preview inside the training run: nothing to save, the plain LoRA path
        parts = block_attention(hidden)
        use_parts_processor(transformer, attached=False)
        plain = block_attention(hidden)
    assert torch.equal(parts, plain)
    lora_io.remove_lora(transformer)
    assert all(type(b.attn.processor) is Flux2ParallelSelfAttnProcessor for b in transformer.single_transformer_blocks)
