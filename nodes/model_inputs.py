"""Model choices shared by the trainer and preview nodes: ComfyUI's file lists and diffusers folders.

A Klein Base is either three files (diffusion model, text encoder, VAE) from ComfyUI's model folders, or a
diffusers folder under ``models/diffusers``. The tokenizer comes from beside the text encoder, else ComfyUI's own.
"""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..klein_core.errors import ModelError
from ..klein_core.model.loading import ResolvedModel, find_tokenizer, resolve_model

NONE = "(none)"  # Combo entry: no file chosen (also keeps the lists non-empty)


def choices(folder: str) -> list[str]:
    return [NONE, *folder_paths.get_filename_list(folder)]


def file_choice(name: str, folder: str, tooltip: str) -> io.Combo.Input:
    """A Combo over the files of one of ComfyUI's model folders, with '(none)' first and chosen."""
    return io.Combo.Input(name, options=choices(folder), default=NONE, tooltip=tooltip)


def full_path(folder: str, name: str) -> str:
    return folder_paths.get_full_path_or_raise(folder, name)


def diffusers_choices() -> list[str]:
    """Folders with a model_index.json under models/diffusers (ComfyUI lists no files there)."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        base = Path(root)
        if base.is_dir():
            found += sorted(str(p.parent.relative_to(base)) for p in base.rglob("model_index.json"))
    return [NONE, *found]


def comfy_tokenizer(text_encoder: Path) -> Path | None:
    """A tokenizer beside the text-encoder file wins; otherwise the Qwen tokenizer that ships inside ComfyUI."""
    if find_tokenizer(text_encoder) is not None:
        return None
    shipped = Path(folder_paths.base_path) / "comfy" / "text_encoders" / "qwen25_tokenizer"
    return shipped if shipped.is_dir() else None


def resolve_choice(diffusers_model: str, diffusion_model: str, text_encoder: str, vae: str) -> ResolvedModel:
    """The chosen Klein Base, guard-checked (headers only). A diffusers folder wins over the three files."""
    if diffusers_model and diffusers_model != NONE:
        for root in folder_paths.get_folder_paths("diffusers"):
            folder = Path(root) / diffusers_model
            if (folder / "model_index.json").exists():
                return resolve_model(folder)
        raise ModelError(f"diffusers model {diffusers_model!r} not found under models/diffusers")
    missing = [
        n for n, v in (("diffusion_model", diffusion_model), ("text_encoder", text_encoder), ("vae", vae)) if v == NONE
    ]
    if missing:
        raise ModelError(f"no model chosen: pick a diffusers folder, or {', '.join(missing)}")
    te_path = Path(full_path("text_encoders", text_encoder))
    return resolve_model(
        full_path("diffusion_models", diffusion_model), te_path, full_path("vae", vae), comfy_tokenizer(te_path)
    )
