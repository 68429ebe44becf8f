"""The pre-trained tiny Klein that draws (``klein_core/assets/tiny_klein_drawn``): the shipped files are the ones its
manifest hashed, it is a Klein Base to the loaders (and to ComfyUI's detection keys), its part-colour reader reads
the world, it draws the prompted part colours, and ``klein-lora make-tiny --pretrained`` still runs end to end."""

from __future__ import annotations

import glob
import hashlib
import json
import random

import pytest
import torch

from klein_core.cli import main
from klein_core.facts import LATENT_CHANNELS, TEXT_TOKENS
from klein_core.model.loading import load_text_encoder, load_transformer, load_vae, read_shapes, resolve_model
from klein_core.model.loading import variant_from_bfl_shapes
from klein_core.model.text import encode_prompts, text_tokens
from klein_core.tools.colour_reader import load_reader, look_labels, part_accuracy, read_colours
from klein_core.tools.pretrain import (
    MANIFEST_FILE,
    PRETRAINED_TEXT_TOKENS,
    READER_FILE,
    SHIPPED_FOLDER,
    SMOKE_BUDGET,
    PretrainBudget,
    caption_embeddings,
    colour_accuracy,
    file_hashes,
    pretrain_tiny,
    render_world,
    shipped_tiny,
)
from klein_core.tools.tiny import COMFY_FILES
from klein_core.tools.world import IDENTITY, world_look

MAX_SHIPPED_BYTES = 10 * 1024 * 1024
SHIPPED = SHIPPED_FOLDER


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((shipped_tiny() / MANIFEST_FILE).read_text())


def test_every_shipped_file_has_the_sha256_its_manifest_recorded(manifest):
    assert manifest["files"], "the manifest lists no files"
    assert file_hashes(SHIPPED) == manifest["files"]  # no file missing, changed or unlisted
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name


def test_the_shipped_model_is_small_fp16_and_its_manifest_says_how_it_was_made(manifest):
    assert sum((SHIPPED / name).stat().st_size for name in manifest["files"]) <= MAX_SHIPPED_BYTES
    assert manifest["command"].startswith("klein-lora make-tiny --pretrained") and manifest["seed"] == 0
    assert manifest["psnr_db"] > 0 and 0 <= manifest["colour_accuracy"]["all_parts"] <= 1
    from safetensors import safe_open

    weights = [n for n in manifest["files"] if n.endswith(".safetensors")]
    assert weights
    for name in weights:
        with safe_open(SHIPPED / name, "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} <= {"F16", "I64"}, name


def test_the_shipped_assets_are_package_data():
    import tomllib

    from klein_core.tools import pretrain

    globs = tomllib.loads((SHIPPED.parent.parent.parent / "pyproject.toml").read_text())
    patterns = globs["tool"]["setuptools"]["package-data"]["klein_core"]
    root = SHIPPED.parent.parent  # the klein_core package folder
    packaged = {m for pattern in patterns for m in glob.glob(pattern, root_dir=root) if (root / m).is_file()}
    shipped = {p.relative_to(root).as_posix() for p in SHIPPED.rglob("*") if p.is_file()}
    assert shipped and packaged == shipped  # setuptools globs like glob: "*" stops at "/"
    assert pretrain.SHIPPED_FOLDER.is_relative_to(root)


def test_the_shipped_model_is_a_klein_base_in_both_formats_with_its_own_text_length():
    resolved = resolve_model(SHIPPED / "diffusers")
    transformer = load_transformer(resolved)
    assert transformer.config.attention_head_dim == 128 and transformer.config.in_channels == LATENT_CHANNELS
    assert not transformer.config.guidance_embeds
    shapes = read_shapes(SHIPPED / "comfyui" / COMFY_FILES["transformer"])
    variant, config = variant_from_bfl_shapes(shapes, SHIPPED / "comfyui" / COMFY_FILES["transformer"])
    assert config["num_attention_heads"] == 1 and config["in_channels"] == LATENT_CHANNELS  # what ComfyUI detects
    text_encoder, tokenizer = load_text_encoder(resolved)
    assert text_tokens(tokenizer) == PRETRAINED_TEXT_TOKENS < TEXT_TOKENS
    assert encode_prompts(text_encoder, tokenizer, [IDENTITY.caption()]).shape[1] == PRETRAINED_TEXT_TOKENS
    comfy = resolve_model(
        SHIPPED / "comfyui" / COMFY_FILES["transformer"],
        SHIPPED / "comfyui" / COMFY_FILES["text_encoder"],
        SHIPPED / "comfyui" / COMFY_FILES["vae"],
    )
    assert comfy.variant == resolved.variant
    # the VAE's group count is not in any tensor shape: the ComfyUI file records it, so both formats decode alike
    latents = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoded = [load_vae(r).decode(latents).sample for r in (resolved, comfy)]
    assert torch.equal(*decoded)


def test_the_random_tiny_klein_keeps_klein_s_512_text_tokens(tiny_diffusers):
    _text_encoder, tokenizer = load_text_encoder(resolve_model(tiny_diffusers))
    assert text_tokens(tokenizer) == TEXT_TOKENS == 512


def test_the_part_colour_reader_reads_fresh_world_pictures():
    pictures, looks = render_world(64, seed=4242, size=64)
    accuracy = part_accuracy(read_colours(load_reader(SHIPPED / READER_FILE), pictures), look_labels(looks))
    assert accuracy["parts"] > 0.9, accuracy


def test_the_shipped_base_draws_the_prompted_part_colours():
    """At 50 sample steps and CFG 4 the three part colours of a prompt are drawn as asked (chance: 1/8 per part,
    0.2% all three); the manifest's figure is measured on 48 held-out looks at the same settings."""
    resolved = resolve_model(SHIPPED / "diffusers")
    transformer, vae = load_transformer(resolved), load_vae(resolved)
    text_encoder, tokenizer = load_text_encoder(resolved)
    rng = random.Random("test-colours")
    looks = [world_look(rng) for _ in range(24)]
    embeds = caption_embeddings(text_encoder, tokenizer, [look.caption() for look in looks])
    accuracy = colour_accuracy(
        load_reader(SHIPPED / READER_FILE), transformer, vae, embeds, looks, PretrainBudget(), seed=1
    )
    print(accuracy)
    assert accuracy["all_parts"] >= 0.7 and accuracy["parts"] > 0.85, accuracy


def test_make_tiny_pretrained_runs_every_stage_and_writes_a_checked_manifest(tmp_path, capsys):
    out = tmp_path / "pretrained"
    assert main(["make-tiny", "--pretrained", "--smoke", "--processes", "2", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["files"] == file_hashes(out)
    assert {"diffusers/model_index.json", READER_FILE, f"comfyui/{COMFY_FILES['transformer']}"} <= set(
        manifest["files"]
    )
    assert "--smoke" in manifest["command"] and set(manifest["seconds"]) == {
        "vae",
        "reader",
        "transformer",
        "evaluation",
    }
    assert resolve_model(out / "diffusers").variant.name
    assert torch.isfinite(torch.tensor(manifest["psnr_db"]))
    assert manifest["processes"] == 2 and "--processes 2" in manifest["command"]
    assert main(["make-tiny", "--pretrained", "--smoke", "--processes", "3", "--out", str(tmp_path / "y")]) == 2
    assert "processes must be 1 or more and divide the batch sizes (8, 32), got 3" in capsys.readouterr().err
    assert main(["make-tiny", "--smoke", "--out", str(tmp_path / "x")]) == 2  # --smoke alone is refused by name
    assert "--smoke and --processes go with --pretrained" in capsys.readouterr().err


def test_two_pretraining_processes_fit_what_one_process_fits_with_the_whole_batch(tmp_path):
    """``--processes 2`` pre-trains data parallel (one single-threaded process per core, torch's DDP): each process
    draws the whole batch, fits its half, and the gradients are averaged, so the whole batch's loss at every training
    step is the one a single process computes (the log prints it to 4 decimals)."""
    losses = {}
    for processes in (1, 2):
        lines: list[str] = []
        pretrain_tiny(tmp_path / str(processes), SMOKE_BUDGET, log=lines.append, processes=processes)
        losses[processes] = [float(line.rsplit("loss", 1)[1]) for line in lines if "training step" in line]
    assert len(losses[1]) == SMOKE_BUDGET.vae_training_steps + SMOKE_BUDGET.transformer_training_steps
    assert losses[2] == pytest.approx(losses[1], abs=2e-4)
