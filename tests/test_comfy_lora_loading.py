"""Our LoRA files in ComfyUI's stock LoRA loader (LoraLoader / ``comfy.sd.load_lora_for_models``).

Two levels:

- everywhere: every key we write maps, by ComfyUI's Flux2 rule, to the BFL weight (and row slice) that our own key map
  says holds that module. The rule is encoded below from ComfyUI 0.33.0's ``comfy/lora.py`` (``model_lora_keys_unet``:
  for Flux models, ``"transformer." + name`` for every name of ``comfy/utils.py`` ``flux_to_diffusers``; the Flux2
  names came with ComfyUI PR #11981, early 2026);
- in a real ComfyUI that runs Klein (``COMFYUI_DIR``, 0.33.0 verified): ComfyUI's diffusion-model loader loads the tiny
  transformer, its LoRA loader applies our file, no key is reported as not loaded, and every patched weight changes by
  exactly the LoRA's delta (q/k/v land in slices of the fused ``img_attn.qkv``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from harness.comfyui import TESTS_DIR
from safetensors.torch import load_file

from klein_core.model.keymap import diffusers_to_bfl_transformer
from klein_core.model.lora import FILE_PREFIX, read_lora_file, save_lora, target_module_names
from klein_core.tools.tiny import COMFY_FILES, TINY_TRANSFORMER_CONFIG

# ComfyUI's Flux2 rule for diffusers-named LoRA keys: "transformer.<module>" -> (BFL weight, slice index in thirds of
# the fused qkv or None for the whole weight). Derived by reading comfy/utils.py flux_to_diffusers (0.33.0).
COMFY_FLUX2_RULE = (
    (r"transformer_blocks\.(\d+)\.attn\.to_q", "double_blocks.{}.img_attn.qkv.weight", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", "double_blocks.{}.img_attn.qkv.weight", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", "double_blocks.{}.img_attn.qkv.weight", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", "double_blocks.{}.txt_attn.qkv.weight", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", "double_blocks.{}.txt_attn.qkv.weight", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", "double_blocks.{}.txt_attn.qkv.weight", 2),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks.{}.img_attn.proj.weight", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks.{}.txt_attn.proj.weight", None),
    (r"transformer_blocks\.(\d+)\.ff\.linear_in", "double_blocks.{}.img_mlp.0.weight", None),
    (r"transformer_blocks\.(\d+)\.ff\.linear_out", "double_blocks.{}.img_mlp.2.weight", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_in", "double_blocks.{}.txt_mlp.0.weight", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_out", "double_blocks.{}.txt_mlp.2.weight", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj", "single_blocks.{}.linear1.weight", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_out", "single_blocks.{}.linear2.weight", None),
)
KLEIN_SIZES = {  # (double blocks, single blocks, heads): 9B and 4B
    "9B": (8, 24, 32),
    "4B": (5, 20, 24),
}


def comfy_target(lora_module_key: str) -> tuple[str, int | None] | None:
    """Where ComfyUI puts a LoRA module named ``transformer.<diffusers module>`` (None: it would not load it)."""
    if not lora_module_key.startswith("transformer."):
        return None
    name = lora_module_key.removeprefix("transformer.")
    for pattern, target, third in COMFY_FLUX2_RULE:
        match = re.fullmatch(pattern, name)
        if match:
            return target.format(match.group(1)), third
    return None


def tiny_transformer():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(**TINY_TRANSFORMER_CONFIG)


def random_lora(transformer, rank: int = 4, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = dict(transformer.named_modules())
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(rank, modules[name].in_features, generator=generator) * 0.1,
            torch.randn(modules[name].out_features, rank, generator=generator) * 0.1,
        )
        for name in target_module_names(transformer)
    }


def expected_bfl_deltas(transformer, weights) -> dict[str, torch.Tensor]:
    """B·A of every module, placed into BFL weights by OUR key map (the converter that writes the ComfyUI files)."""
    deltas = {k: torch.zeros_like(v) for k, v in transformer.state_dict().items()}
    for name, (a, b) in weights.items():
        deltas[f"{name}.weight"] = b @ a
    return {k: v for k, v in diffusers_to_bfl_transformer(deltas).items() if v.abs().max() > 0}


@pytest.mark.parametrize("size", sorted(KLEIN_SIZES))
def test_every_module_we_train_has_a_key_comfyuis_flux2_loader_maps(size):
    from diffusers import Flux2Transformer2DModel

    doubles, singles, heads = KLEIN_SIZES[size]
    config = {
        **TINY_TRANSFORMER_CONFIG,
        "num_layers": doubles,
        "num_single_layers": singles,
        "num_attention_heads": heads,
        "joint_attention_dim": 3 * (4096 if size == "9B" else 2560),
    }
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**config)
    names = target_module_names(transformer)
    assert len(names) == 8 * doubles + 2 * singles
    unmapped = [name for name in names if comfy_target(f"{FILE_PREFIX}{name}") is None]
    assert not unmapped, unmapped


def test_comfyuis_flux2_rule_puts_each_delta_where_our_key_map_puts_that_module(tmp_path):
    """Per module: ComfyUI's target weight and qkv third == the BFL weight and rows our converter fills."""
    transformer = tiny_transformer()
    weights = random_lora(transformer)
    path = save_lora(tmp_path / "lora.safetensors", weights)
    written = {key.rsplit(".lora_", 1)[0] for key in load_file(str(path))}
    assert written == {f"{FILE_PREFIX}{name}" for name in weights}  # what a LoRA file of ours holds
    hidden = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    for name, (a, b) in weights.items():
        target, third = comfy_target(f"{FILE_PREFIX}{name}")
        ours = expected_bfl_deltas(transformer, {name: (a, b)})
        assert list(ours) == [target], (name, list(ours), target)
        rows = ours[target].abs().sum(dim=1).nonzero().flatten()
        if third is None:
            assert ours[target].shape == (b.shape[0], a.shape[1])
        else:
            assert (rows.min().item(), rows.max().item() + 1) == (third * hidden, (third + 1) * hidden), name


# ---- in a real ComfyUI -----------------------------------------------------------------------------------------------
def runs_klein(tree) -> bool:
    """ComfyUI with the Flux2 diffusers LoRA names (PR #11981) and a detector for Klein-sized Flux2."""
    return "to_qkv_mlp_proj" in (tree / "comfy" / "utils.py").read_text()


@pytest.mark.comfy_server
def test_comfyui_stock_lora_loader_loads_every_key_and_patches_exactly_our_delta(comfy_env, tiny_model, tmp_path):
    if not runs_klein(comfy_env.tree):
        pytest.skip(
            f"ComfyUI {comfy_env.version} ({comfy_env.tree}) predates Klein: no Flux2 diffusers LoRA names "
            "(ComfyUI PR #11981, early 2026). Set COMFYUI_DIR to a current ComfyUI tree (0.33.0 verified)."
        )
    from klein_core.model.loading import load_transformer, resolve_model

    transformer = load_transformer(resolve_model(tiny_model / "diffusers"))
    weights = random_lora(transformer, seed=7)
    lora_path = save_lora(tmp_path / "ours.safetensors", weights)
    deltas_path = tmp_path / "comfy_deltas.safetensors"
    completed = comfy_env.run_python(
        str(TESTS_DIR / "harness" / "lora_check.py"),
        str(tiny_model / "comfyui" / COMFY_FILES["transformer"]),
        str(lora_path),
        str(deltas_path),
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])

    assert report["model_class"] == "Flux2"  # ComfyUI's own loader recognised the Klein file
    assert not [w for w in report["warnings"] if "not loaded" in w.lower()], report["warnings"]
    expected = expected_bfl_deltas(transformer, read_lora_file(lora_path))
    assert {k.removeprefix("diffusion_model.") for k in report["patched_keys"]} == set(expected)
    patched = load_file(str(deltas_path))
    assert set(patched) == set(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(patched[key], delta, rtol=1e-4, atol=1e-6, msg=key)
