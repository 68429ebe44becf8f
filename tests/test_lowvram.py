"""Low-VRAM mode: an 8-bit base with the LoRA trained on top, and previews on it.

The backend (torchao or optimum-quanto, the optional ``[lowvram]`` extra) is real or the test skips; without one,
asking for the 8-bit base must fail early with the install command.
"""

from __future__ import annotations

import pytest
import torch

from klein_core.errors import ModelError
from klein_core.model import lora as lora_io
from klein_core.model import lowvram
from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG
from klein_core.train.objective import MicroBatch, accumulate_gradients

INSTALLED = lowvram.available_backends()
needs_backend = pytest.mark.skipif(
    not INSTALLED, reason="no 8-bit backend installed (pip install 'klein-lora-trainer[lowvram]')"
)


def tiny_transformer(seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**TINY_TRANSFORMER_CONFIG).eval().requires_grad_(False)


def batch(seed: int = 1) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(seed)
    return [
        MicroBatch(
            torch.randn(1, 128, 4, 4, generator=g),
            torch.randn(1, 512, 48, generator=g),
            torch.randn(1, 128, 4, 4, generator=g),
            torch.tensor([0.5]),
        )
    ]


def forward(transformer, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, 128, generator=g),
            encoder_hidden_states=torch.randn(1, 512, 48, generator=g),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(1, 16, 4),
            txt_ids=torch.zeros(1, 512, 4),
            guidance=None,
        ).sample


def test_asking_for_a_missing_backend_fails_with_the_install_command(monkeypatch):
    monkeypatch.setattr(lowvram, "backend_available", lambda _backend: False)
    with pytest.raises(ModelError, match=r"pip install 'klein-lora-trainer\[lowvram\]'"):
        lowvram.choose_backend()
    with pytest.raises(ModelError, match="unknown 8-bit backend"):
        lowvram.choose_backend("bitsandbytes")


def test_training_with_a_missing_backend_fails_before_any_model_loads(
    monkeypatch, tiny_diffusers, sample_dataset, tmp_path
):
    from conftest import quick_config, quick_spec

    from klein_core.model.loading import resolve_model
    from klein_core.train import loop as training
    from klein_core.train import session

    monkeypatch.setattr(lowvram, "backend_available", lambda _backend: False)
    monkeypatch.setattr(session, "load_transformer", lambda *a, **k: pytest.fail("the transformer was loaded"))
    with pytest.raises(ModelError, match="lowvram"):
        training.train(
            resolve_model(tiny_diffusers),
            quick_spec(sample_dataset),
            quick_config(base_8bit=True),
            tmp_path,
            callbacks=training.TrainCallbacks(log=lambda _m: None),
            cache_dir=tmp_path / "cache",
        )


@needs_backend
@pytest.mark.parametrize("backend", INSTALLED)
def test_8bit_base_quantises_the_block_weights_and_the_lora_trains_on_top(backend):
    transformer = tiny_transformer()
    reference = forward(transformer)
    assert lowvram.quantize_base_8bit(transformer, "cpu", backend) == backend
    blocks = lowvram.blocks_of(transformer)
    assert all(
        lowvram.is_quantized_weight(m.weight) for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)
    )
    assert not lowvram.is_quantized_weight(transformer.x_embedder.weight)  # embedders stay in full precision
    quantised = forward(transformer)
    assert not torch.equal(quantised, reference)  # int8 is lossy ...
    assert torch.allclose(quantised, reference, atol=0.05 * reference.abs().max().item())  # ... but close

    lora_io.add_lora(transformer, rank=4)
    params = lora_io.lora_parameters(transformer)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        losses.append(accumulate_gradients(transformer, batch()).item())
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    weights = lora_io.adapter_weights(transformer)
    assert len(weights) == lora_io.expected_target_count(2, 2)
    assert any(b.abs().max() > 0 for _, b in weights.values())


@needs_backend
@pytest.mark.parametrize("backend", INSTALLED)
def test_preview_patch_on_an_8bit_base_applies_the_lora_and_restores_exactly(backend):
    trained = tiny_transformer()
    lowvram.quantize_base_8bit(trained, "cpu", backend)
    lora_io.add_lora(trained, rank=4)
    g = torch.Generator().manual_seed(5)
    for p in lora_io.lora_parameters(trained):
        p.data = torch.randn(p.shape, generator=g) * 0.1
    with_adapter = forward(trained)
    weights = lora_io.adapter_weights(trained)
    lora_io.remove_lora(trained)
    base = forward(trained)
    patcher = lora_io.LoraPatcher(trained)
    with patcher.applied(weights):
        patched = forward(trained)
    assert torch.allclose(patched, with_adapter, atol=1e-4)  # the same LoRA as the trained adapter
    assert not torch.allclose(patched, base, atol=1e-4)
    assert torch.equal(forward(trained), base)  # and the base is exactly back


@needs_backend
def test_the_trainer_runs_with_an_8bit_base(tiny_diffusers, sample_dataset, tmp_path, training_cache):
    from conftest import quick_config, quick_spec

    from klein_core.model.loading import resolve_model
    from klein_core.train.config import TrainCallbacks
    from klein_core.train.loop import train

    logs: list[str] = []
    result = train(
        resolve_model(tiny_diffusers),
        quick_spec(sample_dataset),
        quick_config(training_steps=2, save_every=0, base_8bit=True),
        tmp_path,
        callbacks=TrainCallbacks(log=logs.append),
        cache_dir=training_cache,
    )
    assert any(line.startswith("8-bit base: block weights quantised to int8") for line in logs)
    assert result.final_lora.exists()
    assert len(lora_io.read_lora_file(result.final_lora)) == lora_io.expected_target_count(2, 2)


def test_checkpointing_some_blocks_recomputes_single_stream_blocks_first_and_keeps_the_gradients(tiny_diffusers):
    from klein_core.model.loading import load_transformer, resolve_model
    from klein_core.train.objective import flow_matching_loss

    def lora_gradients(checkpointed_blocks):
        transformer = load_transformer(resolve_model(tiny_diffusers)).train()
        transformer.requires_grad_(False)
        if checkpointed_blocks is not None:
            lowvram.enable_block_checkpointing(transformer, checkpointed_blocks)
        torch.manual_seed(0)
        lora_io.add_lora(transformer, 4)
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        calls = [0] * len(lowvram.blocks_of(transformer))
        for index, block in enumerate(lowvram.blocks_of(transformer)):
            block.register_forward_pre_hook(lambda *_a, i=index: calls.__setitem__(i, calls[i] + 1))
        generator = torch.Generator().manual_seed(1)
        latents = torch.randn(1, 128, 4, 4, generator=generator)
        embeds = torch.randn(1, 512, transformer.config.joint_attention_dim, generator=generator)
        flow_matching_loss(
            transformer, latents, embeds, torch.randn(latents.shape, generator=generator), torch.tensor([0.5])
        ).backward()
        return [p.grad.clone() for p in lora_io.lora_parameters(transformer)], calls

    plain, plain_calls = lora_gradients(None)
    partial, partial_calls = lora_gradients(1)
    assert plain_calls == [1] * len(plain_calls)
    # the last block is a single-stream one: a LoRA keeps the most for those, so they are checkpointed first
    assert partial_calls == [1] * (len(plain_calls) - 1) + [2], "only the checkpointed block runs twice"
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, partial))
