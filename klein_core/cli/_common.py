"""Small helpers shared by the CLI subcommands."""

from __future__ import annotations

import json
import sys


def show_sample_progress(done: int, total: int, indent: str = "") -> None:
    """Redraw "sample step d/t" in place on stderr (a terminal only) and clear it when the image is done."""
    sys.stderr.write(f"\r{indent}sample step {done}/{total}")
    if done == total:
        sys.stderr.write("\r\033[K")
    sys.stderr.flush()


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def add_model_args(parser, required: bool = True) -> None:
    """The convention of every command that loads Klein: a diffusers folder, or a diffusion-model file + TE + VAE."""
    parser.add_argument(
        "--model", required=required, help="Klein Base diffusers folder, or a diffusion-model .safetensors"
    )
    parser.add_argument("--text-encoder", help="Qwen3 text-encoder .safetensors (required with a model file)")
    parser.add_argument("--vae", help="Flux2 VAE .safetensors (required with a model file)")
    parser.add_argument("--tokenizer", help="folder with the Qwen tokenizer files (optional)")
