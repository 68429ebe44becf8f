"""State-dict key conversion between diffusers and the BFL/ComfyUI single-file layouts.

One table per model drives both directions, so saving a tiny model in ComfyUI's layout and loading it back are
exact inverses (tests check the transformer direction against diffusers' own single-file converter).
"""

from __future__ import annotations

import re

import torch

COMFY_TRANSFORMER_PREFIX = "model.diffusion_model."

# --- transformer -----------------------------------------------------------------------------------------------
# (BFL name, diffusers name) for whole tensors; block-local names are prefixed by their block below.
_TRANSFORMER_GLOBAL = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    ("single_stream_modulation.lin", "single_stream_modulation.linear"),
    ("final_layer.linear", "proj_out"),
)
_DOUBLE_BLOCK = (
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.linear_in"),
    ("img_mlp.2", "ff.linear_out"),
    ("txt_mlp.0", "ff_context.linear_in"),
    ("txt_mlp.2", "ff_context.linear_out"),
)
_DOUBLE_NORMS = (  # BFL stores QK-norm weights as ``.scale``
    ("img_attn.norm.query_norm", "attn.norm_q"),
    ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"),
    ("txt_attn.norm.key_norm", "attn.norm_added_k"),
)
_DOUBLE_QKV = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
)
_SINGLE_BLOCK = (
    ("linear1", "attn.to_qkv_mlp_proj"),
    ("linear2", "attn.to_out"),
)
_SINGLE_NORMS = (
    ("norm.query_norm", "attn.norm_q"),
    ("norm.key_norm", "attn.norm_k"),
)
_FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """BFL stores the final modulation as (shift, scale); diffusers as (scale, shift)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    return dict(state_dict)


def _move_global_weights(sd: dict[str, torch.Tensor], to_diffusers: bool) -> dict[str, torch.Tensor]:
    """Pop the weights outside the blocks (embedders, final layer) from ``sd``, renamed to the other layout.

    The final modulation's halves swap places between the layouts (shift/scale order).
    """
    out: dict[str, torch.Tensor] = {}
    for bfl, dif in _TRANSFORMER_GLOBAL:
        source, target = (bfl, dif) if to_diffusers else (dif, bfl)
        for suffix in ("weight", "bias"):
            if f"{source}.{suffix}" in sd:
                out[f"{target}.{suffix}"] = sd.pop(f"{source}.{suffix}")
    bfl, dif = _FINAL_MODULATION
    source, target = (bfl, dif) if to_diffusers else (dif, bfl)
    if f"{source}.weight" in sd:
        out[f"{target}.weight"] = _swap_halves(sd.pop(f"{source}.weight"))
    return out


def bfl_to_diffusers_transformer(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a BFL/ComfyUI Flux2 transformer state dict (optionally ``model.diffusion_model.``-prefixed)."""
    sd = strip_prefix(state_dict, COMFY_TRANSFORMER_PREFIX)
    out = _move_global_weights(sd, to_diffusers=True)
    for key in sorted(sd):
        match = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$", key)
        if not match:
            continue
        kind, index, local, suffix = match.groups()
        tensor = sd.pop(key)
        if kind == "double_blocks":
            prefix = f"transformer_blocks.{index}."
            qkv = dict(_DOUBLE_QKV)
            if local in qkv:
                for name, part in zip(qkv[local], tensor.chunk(3, dim=0)):
                    out[f"{prefix}{name}.{suffix}"] = part.clone()
                continue
            table = dict(_DOUBLE_BLOCK + _DOUBLE_NORMS)
        else:
            prefix = f"single_transformer_blocks.{index}."
            table = dict(_SINGLE_BLOCK + _SINGLE_NORMS)
        if local not in table:
            sd[key] = tensor
            continue
        out[f"{prefix}{table[local]}.{'weight' if suffix == 'scale' else suffix}"] = tensor
    if sd:
        unknown = ", ".join(sorted(sd)[:5])
        raise KeyError(f"unrecognised Flux2 transformer keys: {unknown}")
    return out


def diffusers_to_bfl_transformer(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`bfl_to_diffusers_transformer` (without the ComfyUI prefix)."""
    sd = dict(state_dict)
    out = _move_global_weights(sd, to_diffusers=False)
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for i in blocks:
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for fused, parts in _DOUBLE_QKV:
            out[f"{dst}{fused}.weight"] = torch.cat([sd.pop(f"{src}{p}.weight") for p in parts], dim=0)
        for b, d in _DOUBLE_BLOCK:
            out[f"{dst}{b}.weight"] = sd.pop(f"{src}{d}.weight")
        for b, d in _DOUBLE_NORMS:
            out[f"{dst}{b}.scale"] = sd.pop(f"{src}{d}.weight")
    singles = sorted({int(m.group(1)) for k in sd if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})
    for i in singles:
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for b, d in _SINGLE_BLOCK:
            out[f"{dst}{b}.weight"] = sd.pop(f"{src}{d}.weight")
        for b, d in _SINGLE_NORMS:
            out[f"{dst}{b}.scale"] = sd.pop(f"{src}{d}.weight")
    if sd:
        raise KeyError(f"unrecognised diffusers Flux2 transformer keys: {', '.join(sorted(sd)[:5])}")
    return out


# --- VAE (LDM layout used by ComfyUI / BFL ``flux2-vae.safetensors``) ------------------------------------------
_RESNET = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
)
_ATTN = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_VAE_PLAIN = (
    ("conv_in", "conv_in"),
    ("norm_out", "conv_norm_out"),
    ("conv_out", "conv_out"),
)


def _vae_renames(num_levels: int) -> list[tuple[str, str]]:
    """(LDM module prefix, diffusers module prefix) pairs for a VAE with ``num_levels`` resolution levels."""
    pairs: list[tuple[str, str]] = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.{a}", f"{part}.{b}") for a, b in _VAE_PLAIN]
        for j in (1, 2):
            pairs += [(f"{part}.mid.block_{j}.{a}", f"{part}.mid_block.resnets.{j - 1}.{b}") for a, b in _RESNET]
        pairs += [(f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}") for a, b in _ATTN]
    for i in range(num_levels):
        pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        up = num_levels - 1 - i  # LDM counts decoder levels from the bottom
        pairs.append((f"decoder.up.{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
    return pairs


# A resnet block's module path per side: (LDM, diffusers), with {i} the level and {j} the block within it.
_VAE_BLOCKS = {
    "encoder": ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}"),
    "decoder": ("decoder.up.{i}.block.{j}", "decoder.up_blocks.{i}.resnets.{j}"),
}


def _vae_block_renames(key: str, to_diffusers: bool, num_levels: int) -> str | None:
    """A resnet block parameter's key in the other layout; None when ``key`` is not one."""
    names = dict(_RESNET) if to_diffusers else {b: a for a, b in _RESNET}
    for part, (ldm, diffusers) in _VAE_BLOCKS.items():
        source, target = (ldm, diffusers) if to_diffusers else (diffusers, ldm)
        pattern = source.replace(".", r"\.").format(i=r"(\d+)", j=r"(\d+)") + r"\.(\w+)\.(weight|bias)$"
        if m := re.match(pattern, key):
            level, block, name, suffix = m.groups()
            if part == "decoder":
                level = num_levels - 1 - int(level)  # LDM counts decoder levels from the bottom
            return f"{target.format(i=level, j=block)}.{names[name]}.{suffix}"
    return None


def _attention_shape(key: str, tensor: torch.Tensor, to_diffusers: bool) -> torch.Tensor:
    """LDM mid-block attention uses 1x1 convs; diffusers uses Linear layers."""
    if ".attn_1." in key or ".attentions.0." in key:
        if key.endswith("weight") and not re.search(r"(norm|group_norm)\.weight$", key):
            if to_diffusers and tensor.ndim == 4:
                return tensor[:, :, 0, 0]
            if not to_diffusers and tensor.ndim == 2:
                return tensor[:, :, None, None]
    return tensor


def vae_levels(state_dict: dict[str, torch.Tensor], ldm: bool) -> int:
    pattern = r"encoder\.down\.(\d+)\." if ldm else r"encoder\.down_blocks\.(\d+)\."
    return 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(pattern, k)))


def _convert_vae(state_dict: dict[str, torch.Tensor], to_diffusers: bool) -> dict[str, torch.Tensor]:
    """One key walk for both directions: resnet blocks by pattern, every other module by the rename table."""
    levels = vae_levels(state_dict, ldm=to_diffusers)
    pairs = _vae_renames(levels)
    renames = dict(pairs) if to_diffusers else {diffusers: ldm for ldm, diffusers in pairs}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("bn."):  # the batch-norm statistics keep their names; the LDM side has no batch counter
            if to_diffusers or key != "bn.num_batches_tracked":
                out[key] = tensor
            continue
        new = _vae_block_renames(key, to_diffusers, levels)
        if new is None:
            module, _, suffix = key.rpartition(".")
            new = f"{renames[module]}.{suffix}" if module in renames else None
        if new is None:
            raise KeyError(f"unrecognised {'' if to_diffusers else 'diffusers '}Flux2 VAE key: {key}")
        out[new] = _attention_shape(key, tensor, to_diffusers)
    return out


def ldm_to_diffusers_vae(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an LDM/BFL Flux2 VAE state dict (with ``bn.running_*``) to ``AutoencoderKLFlux2`` keys."""
    return _convert_vae(state_dict, to_diffusers=True)


def diffusers_to_ldm_vae(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`ldm_to_diffusers_vae`."""
    return _convert_vae(state_dict, to_diffusers=False)
