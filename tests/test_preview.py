"""Preview grids: a checkpoint x prompt grid at one seed with a no-LoRA control row and a strength sweep, which leaves
the base weights exactly as they were, and the ``klein-lora preview`` command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from klein_core.cli import main
from klein_core.model.loading import load_text_encoder, load_transformer, load_vae, resolve_model
from klein_core.errors import LoraFormatError
from klein_core.model.lora import LoraPatcher, LoraWeights, save_lora, target_module_names
from klein_core.model.text import encode_prompts
from klein_core.preview.grid import (
    CONTROL,
    PreviewCheckpoint,
    PreviewSettings,
    checkpoint_from_file,
    parse_strengths,
    plan_rows,
    preview_run,
    render_preview_grid,
    select_checkpoints,
)
from klein_core.preview.sampling import PreviewError, SamplingInterrupted, sample_base
from klein_core.train.config import SavedCheckpoint

SIZE = 32
SETTINGS = PreviewSettings(width=SIZE, height=SIZE, sample_steps=1, cfg=4.0, seed=7)  # tiny and fast; 50 in real use
PROMPTS = ["photo of kleinchar", "kleinchar in a red hat"]


@pytest.fixture(scope="module")
def model(tiny_diffusers):
    resolved = resolve_model(tiny_diffusers)
    te, tok = load_text_encoder(resolved)
    embeds = encode_prompts(te, tok, PROMPTS)
    negative = encode_prompts(te, tok, [""])[0]
    return SimpleNamespace(
        transformer=load_transformer(resolved), vae=load_vae(resolved), embeds=list(embeds), negative=negative
    )


def random_lora(transformer, seed: int, rank: int = 4, scale: float = 0.05) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    weights = {}
    for name in target_module_names(transformer):
        out_features, in_features = modules[name].weight.shape
        a = torch.randn(rank, in_features, generator=generator) * scale
        b = torch.randn(out_features, rank, generator=generator) * scale
        weights[name] = (a, b)
    return weights


def snapshot(transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in transformer.state_dict().items()}


def assert_bit_identical(before: dict[str, torch.Tensor], transformer) -> None:
    after = transformer.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert changed == []


# --- choosing rows -------------------------------------------------------------------------------------------------
def render_first_prompt(model, rows, settings=SETTINGS, **options):
    """The grid of ``rows`` for the first prompt alone on the tiny model: one column keeps a rendering test short."""
    return render_preview_grid(
        model.transformer, model.vae, PROMPTS[:1], model.embeds[:1], model.negative, rows, settings, **options
    )


def _checkpoints(*steps: int) -> list[PreviewCheckpoint]:
    return [
        PreviewCheckpoint(step, f"lora_step{step:06d}.safetensors", {"m": (torch.zeros(1, 1), torch.zeros(1, 1))})
        for step in steps
    ]


def test_rows_are_the_control_then_each_checkpoint_then_the_strength_sweep_of_the_last():
    checkpoints = _checkpoints(100, 200)
    rows = plan_rows(checkpoints, strengths=(0.6, 1.0, 1.2))
    assert [(r.checkpoint.training_step, r.strength) for r in rows] == [
        (0, 0.0),
        (100, 1.0),
        (200, 1.0),
        (200, 0.6),
        (200, 1.2),
    ]
    assert rows[0].checkpoint is CONTROL and rows[0].label == "step 0: no LoRA (control)"
    assert rows[3].label == "step 200, strength 0.6"


def test_with_no_lora_only_the_base_model_is_rendered():
    assert [r.checkpoint for r in plan_rows([], strengths=(0.5, 1.0))] == [CONTROL]


@pytest.mark.parametrize(
    ("spec", "steps"),
    [("all", [100, 200, 300]), ("last", [300]), ("last 2", [200, 300]), ("100, 300", [100, 300]), ("none", [])],
)
def test_checkpoint_selection(spec, steps):
    assert [c.training_step for c in select_checkpoints(_checkpoints(100, 200, 300), spec)] == steps


def test_selecting_a_missing_checkpoint_names_it_and_the_available_ones():
    with pytest.raises(PreviewError, match=r"training step 150 \(available: 100, 200\)"):
        select_checkpoints(_checkpoints(100, 200), "100, 150")


def test_strengths_parse_from_text_and_name_a_bad_value():
    assert parse_strengths("0.6, 0.8 1.0,1.2") == (0.6, 0.8, 1.0, 1.2)
    assert parse_strengths("") == ()
    with pytest.raises(PreviewError, match="'strong'"):
        parse_strengths("0.8, strong")


# --- rendering -----------------------------------------------------------------------------------------------------
def test_grid_restores_the_base_weights_bit_for_bit(model):
    before = snapshot(model.transformer)
    checkpoints = [
        PreviewCheckpoint(100, "a", random_lora(model.transformer, 1)),
        PreviewCheckpoint(200, "b", random_lora(model.transformer, 2)),
    ]
    render_first_prompt(model, plan_rows(checkpoints, strengths=(0.6, 1.2)))
    assert_bit_identical(before, model.transformer)


def test_cancelling_mid_row_still_restores_the_base_weights(model):
    before = snapshot(model.transformer)
    rows = plan_rows([PreviewCheckpoint(100, "a", random_lora(model.transformer, 1))])
    settings = replace(SETTINGS, sample_steps=2)
    checks = []

    def interrupt() -> bool:
        checks.append(1)
        return len(checks) > settings.sample_steps + 1  # inside the LoRA row, after its first sample step

    with pytest.raises(SamplingInterrupted, match="sample step 1/2"):
        render_first_prompt(model, rows, settings, interrupt=interrupt)
    assert_bit_identical(before, model.transformer)


def test_every_cell_uses_one_seed_and_the_control_row_is_the_plain_base_model(model):
    lora = random_lora(model.transformer, 3, scale=0.2)
    rows = plan_rows([PreviewCheckpoint(100, "a", lora)], strengths=(0.5,))
    result = render_first_prompt(model, rows)
    assert len(result.cells) == 3 and {c.seed for c in result.cells} == {SETTINGS.seed}
    base = sample_base(
        model.transformer,
        model.vae,
        model.embeds[0],
        model.negative,
        SIZE,
        SIZE,
        SETTINGS.sample_steps,
        4.0,
        SETTINGS.seed,
    )[0]
    control, full, half = (next(c for c in result.cells if c.row == r and c.column == 0) for r in range(3))
    assert torch.equal(control.pixels, base)
    assert (full.pixels - control.pixels).abs().max() > 1e-3  # the LoRA was applied
    assert (half.pixels - control.pixels).abs().max() < (full.pixels - control.pixels).abs().max()  # at its strength


def test_progress_counts_all_sample_steps_of_all_cells(model):
    seen = []
    rows = plan_rows([PreviewCheckpoint(100, "a", random_lora(model.transformer, 1))])
    render_preview_grid(
        model.transformer,
        model.vae,
        PROMPTS,
        model.embeds,
        model.negative,
        rows,
        SETTINGS,
        progress=lambda done, total: seen.append((done, total)),
    )
    total = 2 * 2 * SETTINGS.sample_steps
    assert seen == [(i, total) for i in range(1, total + 1)]


def test_grid_cells_and_listing_are_saved_with_checkpoint_strength_prompt_and_seed(model, tmp_path):
    rows = plan_rows(
        [PreviewCheckpoint(500, "lora_step000500.safetensors", random_lora(model.transformer, 1))], strengths=(0.8,)
    )
    result = render_preview_grid(
        model.transformer, model.vae, PROMPTS, model.embeds, model.negative, rows, SETTINGS, out_dir=tmp_path
    )
    listing = json.loads((tmp_path / "preview.json").read_text())
    assert listing["grid"] == "grid.png" and listing["seed"] == 7 and listing["sample_steps"] == SETTINGS.sample_steps
    assert [(c["checkpoint_step"], c["strength"], c["prompt"]) for c in listing["cells"]] == [
        (0, 0.0, PROMPTS[0]),
        (0, 0.0, PROMPTS[1]),
        (500, 1.0, PROMPTS[0]),
        (500, 1.0, PROMPTS[1]),
        (500, 0.8, PROMPTS[0]),
        (500, 0.8, PROMPTS[1]),
    ]
    for cell in listing["cells"]:
        assert Image.open(tmp_path / cell["file"]).size == (SIZE, SIZE)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == result.grid.size and grid.width >= 2 * SIZE and grid.height > 3 * SIZE  # plus label strips
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert result.cells_tensor().shape == (6, SIZE, SIZE, 3) and result.grid_tensor().shape[0] == 1


def test_labels_are_drawn_above_each_cell(model):
    result = render_first_prompt(model, plan_rows([]))
    strip = np.array(result.grid)[: result.grid.height - SIZE]
    assert strip.size and (strip < 128).any()  # dark text pixels on the white label strip


# --- the trainer's in-memory run -------------------------------------------------------------------------------------
def test_preview_of_an_in_memory_run_uses_its_cached_embeddings_and_training_resolution(model, tmp_path):
    from klein_core.health.history import TrainingHistory

    history = TrainingHistory()
    for step in range(1, 41):
        history.add_training_loss(step, 1.5 - step * 0.01)  # a falling loss: the LoRA is learning
    run = SimpleNamespace(
        history=history,
        transformer=model.transformer,
        vae=model.vae,
        trigger="kleinchar",
        resolution=SIZE,
        run_dir=tmp_path,
        checkpoints=[
            SavedCheckpoint(200, tmp_path / "x_step000200.safetensors", random_lora(model.transformer, 2)),
            SavedCheckpoint(100, tmp_path / "x_step000100.safetensors", random_lora(model.transformer, 1)),
        ],
        preview_embeds={"photo of [trigger]": model.embeds[0], "": model.negative},
    )
    before = snapshot(model.transformer)
    settings = PreviewSettings(width=0, height=0, sample_steps=1, cfg=4.0, seed=7)
    result = preview_run(run, ["photo of [trigger]"], settings, checkpoints="last 1", strengths=(0.5,))
    assert [(r.checkpoint.training_step, r.strength) for r in result.rows] == [(0, 0.0), (200, 1.0), (200, 0.5)]
    assert result.settings.width == SIZE and result.cells[0].prompt == "photo of kleinchar"
    assert_bit_identical(before, model.transformer)
    # if it looks weak: at 1 sample step the preview settings come first, more training only after re-rendering
    assert result.weak_lora_advice[0].startswith("Check the preview settings first: sample_steps=1 is below 30")
    assert result.weak_lora_advice[1].startswith(
        "Only if the re-rendered previews still look weak: the training loss is falling"
    )
    with pytest.raises(PreviewError, match="'a cat' was not encoded during training"):
        preview_run(run, ["a cat"], settings)


# --- LoRA files and the CLI ---------------------------------------------------------------------------------------
def test_a_lora_file_knows_its_training_step(model, tmp_path):
    path = save_lora(tmp_path / "mine.safetensors", random_lora(model.transformer, 1), {"training_steps": 750})
    assert checkpoint_from_file(path).training_step == 750
    unnamed = save_lora(tmp_path / "other_step000120.safetensors", random_lora(model.transformer, 1))
    assert checkpoint_from_file(unnamed).training_step == 120


def preview_cli(**flags) -> int:
    """``klein-lora preview`` with ``--flag value`` per keyword (``True``: the bare flag; a list: its values)."""
    argv = ["preview"]
    for name, value in flags.items():
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv += [str(v) for v in (value if isinstance(value, list) else [value])]
    return main(argv)


def test_cli_preview_renders_the_base_model_alone_and_warns_when_under_sampled(tiny_diffusers, tmp_path, capsys):
    code = preview_cli(
        model=tiny_diffusers,
        prompt="photo of [trigger]",
        trigger="kleinchar",
        sample_steps=1,
        cfg=4,
        width=SIZE,
        height=SIZE,
        out=tmp_path,
        json=True,
    )
    captured = capsys.readouterr()
    assert code == 0
    listing = json.loads(captured.out)
    assert [(c["checkpoint_step"], c["prompt"], c["seed"]) for c in listing["cells"]] == [(0, "photo of kleinchar", 0)]
    assert Path(listing["cells"][0]["file"]).is_file() and Path(listing["grid"]).is_file()
    assert "sample_steps 1 is below 30" in captured.err


def test_cli_preview_with_lora_files_and_a_strength_sweep_on_comfyui_files(tiny_comfy_files, model, tmp_path, capsys):
    lora = save_lora(
        tmp_path / "loras" / "kc_step000300.safetensors",
        random_lora(model.transformer, 4),
        {"training_steps": 300, "trigger_word": "kleinchar"},
    )
    code = preview_cli(
        model=tiny_comfy_files["transformer"],
        text_encoder=tiny_comfy_files["text_encoder"],
        vae=tiny_comfy_files["vae"],
        lora=lora,
        prompt="photo of [trigger]",
        sample_steps=1,
        width=SIZE,
        height=SIZE,
        strengths=[0.5, 1.0],
        out=tmp_path / "out",
        json=True,
    )
    assert code == 0
    listing = json.loads(capsys.readouterr().out)
    rows = [(c["checkpoint_step"], c["strength"]) for c in listing["cells"]]
    assert rows == [(0, 0.0), (300, 1.0), (300, 0.5)]
    assert listing["cells"][0]["prompt"] == "photo of kleinchar"  # trigger taken from the LoRA's metadata


def test_cli_preview_refuses_a_size_that_is_not_a_multiple_of_16(tiny_diffusers, tmp_path, capsys):
    code = preview_cli(model=tiny_diffusers, prompt="x", width=40, height=32, out=tmp_path)
    assert code == 2 and "width 40" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- the merge itself: in place, originals off the device, restored bit for bit ---------------------------------------
def tiny_transformer(dtype: torch.dtype):
    from diffusers import Flux2Transformer2DModel

    from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return Flux2Transformer2DModel(**TINY_TRANSFORMER_CONFIG).eval().requires_grad_(False).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_in_place_with_cpu_backups_and_restores_every_weight_bit_for_bit(dtype):
    transformer = tiny_transformer(dtype)
    before = snapshot(transformer)
    weights = random_lora(transformer, 3)
    modules = dict(transformer.named_modules())
    pointers = {name: modules[name].weight.data_ptr() for name in weights}
    patcher = LoraPatcher(transformer)
    with patcher.applied(weights, strength=0.8):
        for name, (a, b) in weights.items():
            weight = modules[name].weight
            assert weight.data_ptr() == pointers[name] and weight.dtype == dtype  # merged into the same storage
            expected = (before[f"{name}.weight"].float() + (b @ a) * 0.8).to(dtype)  # the former out-of-place merge
            torch.testing.assert_close(weight.data, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
            assert not torch.equal(weight.data, before[f"{name}.weight"])
        assert patcher.originals.keys() == weights.keys()
        assert all(backup.device.type == "cpu" for backup in patcher.originals.values())
    assert all(modules[name].weight.data_ptr() == pointers[name] for name in weights)
    assert patcher.originals == {}
    assert_bit_identical(before, transformer)


def test_a_failed_apply_still_restores_the_weights_merged_before_it():
    transformer = tiny_transformer(torch.float32)
    before = snapshot(transformer)
    weights = dict(random_lora(transformer, 4))
    weights["transformer_blocks.0.attn.no_such_module"] = next(iter(weights.values()))
    with pytest.raises(LoraFormatError, match="no_such_module"), LoraPatcher(transformer).applied(weights):
        pass
    assert_bit_identical(before, transformer)
