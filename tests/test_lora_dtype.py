"""The LoRA computes in the base's dtype: fp32 master weights (what AdamW updates), bf16 matmuls on a bf16 base (a
GPU run), and exactly the plain LoRA formula on an fp32 base (the CPU)."""

from __future__ import annotations

import torch

from klein_core.model import lora as lora_io
from klein_core.model.latents import predict_velocity
from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG
from harness.tiny_lora import adapted_tiny_transformer


def _forward(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 16, 128, generator=generator).to(dtype)
    embeds = torch.randn(1, 8, TINY_TRANSFORMER_CONFIG["joint_attention_dim"], generator=generator).to(dtype)
    return predict_velocity(transformer, hidden, torch.tensor([0.5], dtype=dtype), embeds, 4, 4)


def _plain_lora_output(module, x: torch.Tensor) -> torch.Tensor:
    base = module.get_base_layer()(x)
    down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
    return base + (x.float() @ down.T @ up.T * module.scaling["default"]).to(base.dtype)


def test_on_an_fp32_base_each_adapted_layer_gives_the_plain_lora_formula():
    transformer = adapted_tiny_transformer(torch.float32)
    layer = transformer.transformer_blocks[0].attn.to_q
    x = torch.randn(1, 16, layer.in_features, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x), _plain_lora_output(layer, x), rtol=1e-6, atol=1e-6)


def test_on_a_bf16_base_the_lora_runs_in_bf16_with_fp32_master_weights_and_gradients():
    reference = adapted_tiny_transformer(torch.float32)
    transformer = adapted_tiny_transformer(torch.bfloat16)
    with torch.no_grad():
        for ours, theirs in zip(transformer.parameters(), reference.parameters()):
            theirs.copy_(ours.float())  # the same bf16-representable weights in both
    out = _forward(transformer, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _forward(reference, torch.float32), rtol=0.05, atol=0.05)
    out.float().square().mean().backward()
    params = lora_io.lora_parameters(transformer)
    assert params and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    assert all(p.grad.abs().sum() > 0 for p in params), "every LoRA matrix gets a gradient"


def _saved_bytes_by_dtype(transformer: torch.nn.Module) -> dict[torch.dtype, int]:
    weights = {param.untyped_storage()._cdata for param in transformer.parameters()}
    storages: dict[int, tuple[torch.dtype, int]] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            storages[storage._cdata] = (tensor.dtype, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        _forward(transformer, torch.bfloat16)
    totals: dict[torch.dtype, int] = {}
    for dtype, nbytes in storages.values():
        totals[dtype] = totals.get(dtype, 0) + nbytes
    return totals


def test_a_bf16_lora_keeps_no_fp32_copies_of_its_inputs_as_peft_plain_lora_does():
    ours = _saved_bytes_by_dtype(adapted_tiny_transformer(torch.bfloat16))
    plain_transformer = adapted_tiny_transformer(torch.bfloat16)
    for module in plain_transformer.modules():
        if isinstance(module, lora_io.LoraLayer):  # peft's own path: inputs cast to the fp32 adapter
            module.lora_variant.pop("default")
            module.cast_input_dtype_enabled = True
    plain = _saved_bytes_by_dtype(plain_transformer)
    adapted_input_bytes = 16 * 128 * 4  # at least one (tokens x width) fp32 input per adapted image-stream layer
    assert (
        plain[torch.float32] - ours.get(torch.float32, 0)
        >= adapted_input_bytes * lora_io.expected_target_count(2, 2) // 2
    )
    assert sum(ours.values()) < sum(plain.values())
