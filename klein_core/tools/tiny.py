"""A tiny, random-initialised FLUX.2 [klein] Base built offline with the real classes.

Every test and the demo run the full-size code path on it: the same diffusers/transformers classes, the same
on-disk formats users have (a diffusers folder, and ComfyUI's single files with BFL keys), just small. It keeps
what real ComfyUI needs to recognise a Flux2 transformer (head dim 128, 128 input channels, rope axes 32x4, no
guidance embedding) and a Qwen3 with 28 layers so hidden states 9/18/27 exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_save_safetensors, atomic_write_json
from ..facts import transformer_config
from ..model.keymap import diffusers_to_bfl_transformer, diffusers_to_ldm_vae
from ..model.loading import VAE_GROUPS_METADATA

TINY_TRANSFORMER_CONFIG = transformer_config(
    hidden_size=128,
    num_layers=2,
    num_single_layers=2,
    joint_attention_dim=48,  # 3 x text-encoder hidden size (16)
)
TINY_VAE_CONFIG = dict(
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    norm_num_groups=32,
    latent_channels=32,
)
TINY_TEXT_ENCODER_CONFIG = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=28,  # >= 28: HF replaces the last hidden state with the final-normed output
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=1024,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
SCHEDULER_CONFIG = dict(
    _class_name="FlowMatchEulerDiscreteScheduler",
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Renders exactly what Qwen3's own template renders for one user message with enable_thinking=False.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
TOKENIZER_CORPUS = (
    "photo of a person standing in a park, close-up portrait, smiling, red hat, blue coat, "
    "in the city at night, sitting on a bench, full body, looking at the camera, kleinchar, "
    "a character with a round face, on the beach, in a forest, indoors, studio lighting"
)

COMFY_FILES = {
    "transformer": "diffusion_models/flux-2-klein-base-tiny.safetensors",
    "distilled_transformer": "diffusion_models/flux-2-klein-tiny.safetensors",
    "text_encoder": "text_encoders/qwen3-tiny.safetensors",
    "vae": "vae/flux2-vae-tiny.safetensors",
    "tokenizer": "text_encoders/qwen3-tiny-tokenizer",
}


@dataclass(frozen=True)
class TinyPaths:
    """Where :func:`make_tiny` wrote each format (None for a format not asked for)."""

    diffusers: Path | None
    comfy_transformer: Path | None
    comfy_text_encoder: Path | None
    comfy_vae: Path | None
    comfy_tokenizer: Path | None


def build_tokenizer(corpus: str = TOKENIZER_CORPUS, text_tokens: int | None = None):
    """A byte-level BPE tokenizer in the Qwen2 class, trained offline on a fixed corpus (deterministic).

    ``text_tokens`` (the pre-trained tiny Klein's shorter text) is saved as the tokenizer's ``model_max_length``,
    which :func:`klein_core.model.text.text_tokens` reads; None keeps Klein's 512."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([corpus] * 4, trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        **({} if text_tokens is None else {"model_max_length": text_tokens}),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_components(seed: int = 0):
    """Return (transformer, vae, text_encoder, tokenizer, scheduler), random-initialised from ``seed``."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER_CONFIG)
    vae = AutoencoderKLFlux2(**TINY_VAE_CONFIG)
    # Non-trivial batch-norm statistics, so normalisation bugs show up in tests.
    generator = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.2)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) * 1.5 + 0.5)
    te_config = Qwen3Config(vocab_size=len(tokenizer), **TINY_TEXT_ENCODER_CONFIG)
    text_encoder = Qwen3ForCausalLM(te_config)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    for module in (transformer, vae, text_encoder):
        module.eval()
    return transformer, vae, text_encoder, tokenizer, scheduler


def write_diffusers(folder: Path, components, distilled: bool) -> None:
    transformer, vae, text_encoder, tokenizer, scheduler = components
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "Flux2KleinPipeline",
        "_diffusers_version": "0.42.1",
        "is_distilled": distilled,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    atomic_write_json(folder / "model_index.json", index)


def write_comfy(root: Path, components, distilled: bool) -> tuple[Path, Path, Path, Path]:
    transformer, vae, text_encoder, tokenizer, _ = components
    transformer_path = root / COMFY_FILES["distilled_transformer" if distilled else "transformer"]
    bfl = diffusers_to_bfl_transformer(transformer.state_dict())
    atomic_save_safetensors({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, transformer_path)
    te_path = root / COMFY_FILES["text_encoder"]
    te_state = {k: v for k, v in text_encoder.state_dict().items() if k != "lm_head.weight"}
    atomic_save_safetensors(te_state, te_path)
    vae_path = root / COMFY_FILES["vae"]
    groups = {VAE_GROUPS_METADATA: str(vae.config.norm_num_groups)}  # not readable from any tensor's shape
    atomic_save_safetensors(diffusers_to_ldm_vae(vae.state_dict()), vae_path, metadata=groups)
    tokenizer_path = root / COMFY_FILES["tokenizer"]
    tokenizer.save_pretrained(tokenizer_path)
    return transformer_path, te_path, vae_path, tokenizer_path


def make_tiny(out: str | Path, fmt: str = "both", distilled: bool = False, seed: int = 0) -> TinyPaths:
    """Write a tiny Klein to ``out``: ``out/diffusers/`` and/or ``out/comfyui/{diffusion_models,text_encoders,vae}``."""
    if fmt not in ("diffusers", "comfyui", "both"):
        raise ValueError(f"format must be diffusers, comfyui or both, got {fmt!r}")
    out = Path(out)
    components = build_tiny_components(seed)
    diffusers_dir = None
    comfy = (None, None, None, None)
    if fmt in ("diffusers", "both"):
        diffusers_dir = out / "diffusers"
        write_diffusers(diffusers_dir, components, distilled)
    if fmt in ("comfyui", "both"):
        comfy = write_comfy(out / "comfyui", components, distilled)
    return TinyPaths(diffusers_dir, *comfy)
