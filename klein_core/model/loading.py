"""Load FLUX.2 [klein] Base from a diffusers folder or from ComfyUI's single files, with guardrails first.

``resolve_model`` reads only file headers and configs, so every guardrail (distilled weights, a non-Klein model,
a truncated file, a text encoder or VAE that does not match the transformer) fires before any tensor is loaded.
The components load separately (``load_text_encoder``, ``load_vae``, ``load_transformer``) so the 16 GB text
encoder can be used, cached and freed before the transformer arrives. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError
from ..facts import HEAD_DIM, KLEIN_SHAPES, LATENT_CHANNELS, TEXT_ENCODER_LAYERS, transformer_config
from .keymap import COMFY_TRANSFORMER_PREFIX, bfl_to_diffusers_transformer, ldm_to_diffusers_vae, strip_prefix

KNOWN_VARIANTS = {shape.hidden_size: shape for shape in KLEIN_SHAPES.values()}  # transformer hidden size -> shape
TEXT_ENCODER_NAMES = {shape.text_encoder_hidden_size: shape.text_encoder for shape in KLEIN_SHAPES.values()}
BASE_FILE_NAMES = {"9B": "flux-2-klein-base-9b.safetensors", "4B": "flux-2-klein-base-4b.safetensors"}
TE_PREFIXES = ("text_encoders.qwen3_8b.transformer.", "text_encoders.qwen3_4b.transformer.")


@dataclass(frozen=True)
class KleinVariant:
    """What the transformer's shapes say it is."""

    name: str  # "9B", "4B" or "custom (hidden H, D double + S single blocks)" such as the tiny test model
    hidden_size: int
    num_layers: int
    num_single_layers: int
    joint_attention_dim: int

    @property
    def text_encoder_hidden_size(self) -> int:
        return self.joint_attention_dim // 3


@dataclass
class ResolvedModel:
    """A checked model source: paths, format, variant and configs, with no weights loaded yet."""

    format: str  # "diffusers" or "comfyui"
    transformer_path: Path
    text_encoder_path: Path
    vae_path: Path
    tokenizer_path: Path | None
    variant: KleinVariant
    transformer_config: dict
    text_encoder_config: dict
    vae_config: dict
    warnings: list[str] = field(default_factory=list)

    def source_args(self) -> dict[str, str | None]:
        """The ``resolve_model`` arguments that resolve these files again (a run folder's record of its model)."""
        if self.format == "diffusers":
            return {
                "model": str(self.transformer_path.parent),
                "text_encoder": None,
                "vae": None,
                "tokenizer": None if self.tokenizer_path is None else str(self.tokenizer_path),
            }
        return {
            "model": str(self.transformer_path),
            "text_encoder": str(self.text_encoder_path),
            "vae": str(self.vae_path),
            "tokenizer": None if self.tokenizer_path is None else str(self.tokenizer_path),
        }

    @property
    def identity(self) -> str:
        """A short id of these exact files (names, sizes, mtimes) for cache keys and run manifests."""
        h = hashlib.sha256()
        for path in (self.transformer_path, self.text_encoder_path, self.vae_path):
            for f in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
                st = f.stat()
                h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


# --- header reading ---------------------------------------------------------------------------------------------
def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (or a sharded diffusers folder); no tensor data read."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise ModelError(f"no .safetensors weights in {path}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        _check_complete(file)
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"{file} is not a readable safetensors file ({exc}); re-download it") from exc
    return shapes


def _check_complete(file: Path) -> None:
    """A safetensors file is 8 bytes of header length, the JSON header, then data up to the last offset."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ModelError(f"{file} is truncated or corrupt (header cut off); re-download it")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"{file} is truncated or corrupt ({exc}); re-download it") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelError(f"{file} is truncated: {size} bytes on disk, {8 + header_len + end} expected; re-download it")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        _check_complete(file)
        try:
            state.update(load_file(str(file)))
        except Exception as exc:
            raise ModelError(f"{file} could not be read ({exc}); re-download it") from exc
    return state


# --- recognising what a transformer file is ---------------------------------------------------------------------
def _describe_foreign(keys: set[str]) -> str | None:
    """Name a non-Klein model from its keys, or None when it looks like a Flux2 transformer."""
    if any(k.startswith("input_blocks.") or k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "a Stable Diffusion UNet"
    if (
        any(".img_mod.lin." in k for k in keys)
        or "x_embedder.weight" in keys
        and "transformer_blocks.0.norm1.linear.weight" in keys
    ):
        return "a FLUX.1 transformer"
    if any(k.startswith("joint_blocks.") for k in keys):
        return "an SD3 transformer"
    if any(k.startswith("model.layers.") for k in keys):
        return "a text encoder (Qwen/LLM weights), not a diffusion model"
    if any(k.startswith("encoder.down.") or k.startswith("encoder.down_blocks.") for k in keys):
        return "a VAE, not a diffusion model"
    return None


def variant_from_bfl_shapes(shapes: dict[str, tuple[int, ...]], path: Path) -> tuple[KleinVariant, dict]:
    """Detect the Klein size from BFL tensor shapes and build the diffusers transformer config locally."""
    shapes = {
        k[len(COMFY_TRANSFORMER_PREFIX) :] if k.startswith(COMFY_TRANSFORMER_PREFIX) else k: v
        for k, v in shapes.items()
    }
    keys = set(shapes)
    foreign = _describe_foreign(keys)
    needed = ("img_in.weight", "txt_in.weight", "double_stream_modulation_img.lin.weight")
    if foreign or not all(k in keys for k in needed):
        raise ModelError(
            f"{path} is {foreign or 'not a FLUX.2 transformer'}; expected a FLUX.2 [klein] Base diffusion model"
        )
    hidden, in_channels = shapes["img_in.weight"]
    joint = shapes["txt_in.weight"][1]
    doubles = len({k.split(".")[1] for k in keys if k.startswith("double_blocks.")})
    singles = len({k.split(".")[1] for k in keys if k.startswith("single_blocks.")})
    if any(k.startswith("guidance_in.") for k in keys):
        raise ModelError(
            f"{path} is FLUX.2 [dev] (it has a guidance embedding, {hidden // HEAD_DIM} heads, {singles} single "
            "blocks), not FLUX.2 [klein]; use flux-2-klein-base-9b.safetensors or -4b"
        )
    if in_channels != LATENT_CHANNELS or hidden % HEAD_DIM:
        raise ModelError(f"{path} has {in_channels} input channels / hidden {hidden}: not a FLUX.2 [klein] transformer")
    variant = _name_variant(hidden, doubles, singles, joint)
    config = transformer_config(
        hidden,
        doubles,
        singles,
        joint,
        timestep_channels=shapes["time_in.in_layer.weight"][1],
        mlp_ratio=shapes["double_blocks.0.img_mlp.2.weight"][1] / hidden,
    )
    return variant, config


def _name_variant(hidden: int, doubles: int, singles: int, joint: int) -> KleinVariant:
    known = KNOWN_VARIANTS.get(hidden)
    if known and (known.num_layers, known.num_single_layers) == (doubles, singles):
        name = known.name
    else:
        name = f"custom (hidden {hidden}, {doubles} double + {singles} single blocks)"
    return KleinVariant(name, hidden, doubles, singles, joint)


def _check_distilled_name(path: Path, allow_distilled: bool) -> str | None:
    """Single files carry no flag: go by BFL's names (``flux-2-klein-9b`` is distilled, ``-base-`` is Base)."""
    name = path.name.lower()
    if "klein" not in name:
        return f"{path.name}: cannot tell Base from distilled by name; make sure it is a klein *base* file"
    if "base" not in name and not allow_distilled:
        size = re.search(r"(\d+)b", name)
        suggestion = BASE_FILE_NAMES.get(f"{size.group(1)}B" if size else "9B", "flux-2-klein-base-9b.safetensors")
        raise ModelError(
            f"{path} is a distilled FLUX.2 [klein] (4-step, CFG 1) model by its name; LoRAs trained on distilled "
            f"weights collapse or come out generic. Train on the Base model instead: {suggestion}"
        )
    return None


# --- text encoder and VAE configs from shapes -------------------------------------------------------------------
def text_encoder_config_from_shapes(shapes: dict[str, tuple[int, ...]], path: Path) -> dict:
    shapes = _strip_te_prefix(shapes)
    if "model.embed_tokens.weight" not in shapes or "model.layers.0.self_attn.q_norm.weight" not in shapes:
        raise ModelError(f"{path} is not a Qwen3 text encoder (no model.embed_tokens / q_norm weights)")
    vocab, hidden = shapes["model.embed_tokens.weight"]
    head_dim = shapes["model.layers.0.self_attn.q_norm.weight"][0]
    layers = len({k.split(".")[2] for k in shapes if k.startswith("model.layers.")})
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["model.layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=layers,
        num_attention_heads=shapes["model.layers.0.self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=shapes["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
        head_dim=head_dim,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings="lm_head.weight" not in shapes,
    )


def _strip_te_prefix(state: dict) -> dict:
    for prefix in TE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return strip_prefix(state, prefix)
    return state


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's free-form metadata (empty when there is none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


VAE_GROUPS_METADATA = "norm_num_groups"  # group norms have no shape to read it from: a tiny VAE may record it here


def vae_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], path: Path, metadata: dict[str, str] | None = None
) -> dict:
    if "bn.running_mean" not in shapes or "encoder.conv_in.weight" not in shapes:
        raise ModelError(
            f"{path} is not a FLUX.2 VAE (flux2-vae.safetensors): it has no batch-norm statistics "
            "(a FLUX.1/SD VAE has 16 or 4 latent channels; Klein needs the FLUX.2 VAE with 32)"
        )
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
    channels = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels))
    per_block = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    latent = shapes["encoder.conv_out.weight"][0] // 2
    if latent != 32:
        raise ModelError(f"{path} has {latent} latent channels; FLUX.2 [klein] needs the FLUX.2 VAE (32)")
    return dict(
        block_out_channels=channels,
        layers_per_block=per_block,
        latent_channels=latent,
        norm_num_groups=int((metadata or {}).get(VAE_GROUPS_METADATA, 32 if min(channels) >= 32 else min(channels))),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
    )


def _check_text_encoder_matches(variant: KleinVariant, te_config: dict, te_path: Path, tr_path: Path) -> None:
    te_hidden = te_config["hidden_size"]
    if te_hidden * 3 != variant.joint_attention_dim:
        want = TEXT_ENCODER_NAMES.get(variant.text_encoder_hidden_size, f"hidden {variant.text_encoder_hidden_size}")
        got = TEXT_ENCODER_NAMES.get(te_hidden, f"hidden {te_hidden}")
        raise ModelError(
            f"text encoder {te_path} ({got}) does not match transformer {tr_path} (Klein {variant.name} needs {want})"
        )
    if te_config["num_hidden_layers"] < max(TEXT_ENCODER_LAYERS) + 1:
        raise ModelError(
            f"text encoder {te_path} has {te_config['num_hidden_layers']} layers; Klein reads hidden states "
            f"{TEXT_ENCODER_LAYERS}, so it needs at least 28"
        )


# --- resolving a source -----------------------------------------------------------------------------------------
def resolve_model(
    model: str | os.PathLike,
    text_encoder: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    allow_distilled: bool = False,
) -> ResolvedModel:
    """Check a model source and describe it, reading headers only. Raises ModelError before any compute."""
    model = Path(model)
    if not model.exists():
        raise ModelError(f"model not found: {model}")
    if model.is_dir():
        return _resolve_diffusers(model, tokenizer, allow_distilled)
    if text_encoder is None or vae is None:
        missing = " and ".join(n for n, v in (("--text-encoder", text_encoder), ("--vae", vae)) if v is None)
        raise ModelError(
            f"{model} is a single diffusion-model file: also give {missing} (ComfyUI's text_encoders/ and vae/ files)"
        )
    return _resolve_comfy(model, Path(text_encoder), Path(vae), tokenizer, allow_distilled)


def _resolve_diffusers(folder: Path, tokenizer: str | os.PathLike | None, allow_distilled: bool) -> ResolvedModel:
    index_path = folder / "model_index.json"
    if not index_path.exists():
        inside = sorted(p.parent for p in folder.glob("*/model_index.json"))
        hint = f"; did you mean {', '.join(map(str, inside))}?" if inside else ""
        raise ModelError(f"{folder} is not a diffusers model folder (no model_index.json){hint}")
    index = json.loads(index_path.read_text())
    cls = index.get("_class_name", "")
    if cls not in ("Flux2KleinPipeline", "Flux2KleinKVPipeline"):
        raise ModelError(f"{folder} holds a {cls or 'unknown'} model, not FLUX.2 [klein] (Flux2KleinPipeline)")
    if (index.get("is_distilled") or cls == "Flux2KleinKVPipeline") and not allow_distilled:
        raise ModelError(
            f"{folder} is a distilled FLUX.2 [klein] (model_index.json is_distilled=true); LoRAs trained on it "
            "collapse or come out generic. Use black-forest-labs/FLUX.2-klein-base-9B (or -base-4B) instead"
        )
    for part in ("transformer", "text_encoder", "vae"):
        if not (folder / part / "config.json").exists():
            raise ModelError(f"{folder / part} is missing (config.json not found)")
    tr_config = {
        k: v for k, v in json.loads((folder / "transformer/config.json").read_text()).items() if not k.startswith("_")
    }
    te_config = json.loads((folder / "text_encoder/config.json").read_text())
    vae_config = {
        k: v for k, v in json.loads((folder / "vae/config.json").read_text()).items() if not k.startswith("_")
    }
    if tr_config.get("guidance_embeds", False):
        raise ModelError(f"{folder} is FLUX.2 [dev] (guidance embedding), not FLUX.2 [klein]")
    for part in ("transformer", "text_encoder", "vae"):
        read_shapes(folder / part)  # truncation check for every weight file
    hidden = tr_config["num_attention_heads"] * tr_config["attention_head_dim"]
    variant = _name_variant(
        hidden, tr_config["num_layers"], tr_config["num_single_layers"], tr_config["joint_attention_dim"]
    )
    te_config = {k: te_config[k] for k in te_config if not k.startswith("_")}
    _check_text_encoder_matches(variant, te_config, folder / "text_encoder", folder / "transformer")
    tok = Path(tokenizer) if tokenizer else folder / "tokenizer"
    return ResolvedModel(
        "diffusers",
        folder / "transformer",
        folder / "text_encoder",
        folder / "vae",
        tok,
        variant,
        tr_config,
        te_config,
        vae_config,
    )


def _resolve_comfy(
    transformer: Path, text_encoder: Path, vae: Path, tokenizer: str | os.PathLike | None, allow_distilled: bool
) -> ResolvedModel:
    for path, what in ((text_encoder, "text encoder"), (vae, "VAE")):
        if not path.is_file():
            raise ModelError(f"{what} file not found: {path}")
    warnings = []
    shapes = read_shapes(transformer)
    variant, tr_config = variant_from_bfl_shapes(shapes, transformer)
    note = _check_distilled_name(transformer, allow_distilled)
    if note:
        warnings.append(note)
    te_shapes = read_shapes(text_encoder)
    te_config = text_encoder_config_from_shapes(te_shapes, text_encoder)
    _check_text_encoder_matches(variant, te_config, text_encoder, transformer)
    vae_config = vae_config_from_shapes(read_shapes(vae), vae, read_metadata(vae))
    tok = Path(tokenizer) if tokenizer else find_tokenizer(text_encoder)
    return ResolvedModel(
        "comfyui", transformer, text_encoder, vae, tok, variant, tr_config, te_config, vae_config, warnings
    )


def find_tokenizer(text_encoder: Path) -> Path | None:
    """A tokenizer folder beside the text-encoder file: ``<stem>-tokenizer/`` or ``tokenizer/``."""
    for candidate in (text_encoder.with_name(f"{text_encoder.stem}-tokenizer"), text_encoder.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    return None


# --- loading components -----------------------------------------------------------------------------------------
def _dequantize_fp8(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ComfyUI fp8 files: float8 weights with per-tensor scales (``scale_weight`` or ``weight_scale``)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith((".scale_weight", ".weight_scale", ".scale_input", ".input_scale")) or key == "scaled_fp8":
            continue
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            base = key[: -len(".weight")] if key.endswith(".weight") else key
            scale = state.get(f"{base}.scale_weight", state.get(f"{base}.weight_scale"))
            tensor = tensor.to(torch.float32)
            if scale is not None:
                tensor = tensor * scale.to(torch.float32)
        out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def _instantiate(cls, config: dict, state: dict[str, torch.Tensor], what: Path, dtype: torch.dtype, device):
    """Build ``cls(**config)`` on the meta device and assign the weights (no full-size random init)."""
    with torch.device("meta"):
        module = cls(**config)
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelError(
            f"{what}: weights do not fit the detected config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return module.to(device=device, dtype=dtype).eval()


def default_device() -> str:
    """Where training and previews run unless told otherwise: the CUDA GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_dtype(device) -> torch.dtype:
    """The dtype the transformer and text encoder load in on ``device``: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_transformer(resolved: ResolvedModel, dtype: torch.dtype = torch.float32, device="cpu"):
    from diffusers import Flux2Transformer2DModel

    if resolved.format == "diffusers":
        model = Flux2Transformer2DModel.from_pretrained(
            resolved.transformer_path, torch_dtype=dtype, local_files_only=True
        )
        return model.to(device).eval()
    state = _dequantize_fp8(load_tensors(resolved.transformer_path), dtype)
    state = bfl_to_diffusers_transformer(state)
    return _instantiate(
        Flux2Transformer2DModel, resolved.transformer_config, state, resolved.transformer_path, dtype, device
    )


def load_vae(resolved: ResolvedModel, dtype: torch.dtype = torch.float32, device="cpu"):
    from diffusers import AutoencoderKLFlux2

    if resolved.format == "diffusers":
        return (
            AutoencoderKLFlux2.from_pretrained(resolved.vae_path, torch_dtype=dtype, local_files_only=True)
            .to(device)
            .eval()
        )
    state = ldm_to_diffusers_vae(load_tensors(resolved.vae_path))
    state.setdefault("bn.num_batches_tracked", torch.tensor(0))
    with torch.device("meta"):
        vae = AutoencoderKLFlux2(**resolved.vae_config)
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.to(device=device, dtype=dtype).eval()


def load_text_encoder(resolved: ResolvedModel, dtype: torch.dtype = torch.float32, device="cpu"):
    """Return (text_encoder, tokenizer)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = load_tokenizer(resolved.tokenizer_path, resolved.text_encoder_path)
    if resolved.format == "diffusers":
        te = Qwen3ForCausalLM.from_pretrained(resolved.text_encoder_path, dtype=dtype, local_files_only=True)
        return keep_layers_klein_reads(te).to(device).eval(), tokenizer
    state = _strip_te_prefix(_dequantize_fp8(load_tensors(resolved.text_encoder_path), dtype))
    config = Qwen3Config(**resolved.text_encoder_config)
    with torch.device("meta"):
        te = Qwen3ForCausalLM(config)
    missing, unexpected = te.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(
            f"{resolved.text_encoder_path}: weights do not fit Qwen3 "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if config.tie_word_embeddings:
        te.lm_head.weight = te.model.embed_tokens.weight
    te.model.rotary_emb = type(te.model.rotary_emb)(config=config)  # rebuild rope buffers off the meta device
    return keep_layers_klein_reads(te).to(device=device, dtype=dtype).eval(), tokenizer


def text_encoder_layers_needed() -> int:
    """Decoder layers Klein's embeddings depend on: hidden state i is the input of layer i, so layers past the
    deepest one read (27) never affect them."""
    return max(TEXT_ENCODER_LAYERS) + 1


def keep_layers_klein_reads(text_encoder):
    """Drop the decoder layers after the deepest hidden state Klein reads (Qwen3-8B: 36 -> 28 layers, 15.3 -> 12.4
    GiB in bf16), before the encoder reaches the device. The embeddings are unchanged: a causal decoder's hidden
    state i does not depend on later layers, and the final norm applies only after the last layer, which is never
    read. This is what lets the 8-bit mode's cache fill fit a 16 GiB card."""
    needed = text_encoder_layers_needed()
    layers = text_encoder.model.layers
    if len(layers) > needed:
        text_encoder.model.layers = layers[:needed]
        text_encoder.config.num_hidden_layers = needed
        if getattr(text_encoder.config, "layer_types", None):
            text_encoder.config.layer_types = text_encoder.config.layer_types[:needed]
    return text_encoder


def load_tokenizer(tokenizer_path: Path | None, text_encoder_path: Path):
    from transformers import AutoTokenizer

    if tokenizer_path is None or not Path(tokenizer_path).is_dir():
        where = tokenizer_path or text_encoder_path.with_name(f"{text_encoder_path.stem}-tokenizer")
        raise ModelError(
            f"no Qwen tokenizer found at {where}: put the tokenizer files (tokenizer.json, or vocab.json + "
            "merges.txt + tokenizer_config.json) there, or pass --tokenizer DIR. Inside ComfyUI the copy in "
            "comfy/text_encoders/qwen25_tokenizer is used"
        )
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"tokenizer at {tokenizer_path} could not be loaded ({exc})") from exc
