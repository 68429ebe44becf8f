"""KleinBasePreviewSampler against ComfyUI's real node API.

Runs only where ``comfy_api`` is importable (skipped otherwise, never faked). tests/test_comfy_server.py runs this
file inside the real ComfyUI's own venv, so CI always executes it; the plain test interpreter skips it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from harness.comfyui import import_pack_module, require_comfy_api

SIZE = 32
COMMON = dict(
    prompts="photo of [trigger]",
    trigger="",
    sample_steps=1,
    cfg=4.0,
    seed=5,
    width=SIZE,
    height=SIZE,
    checkpoints="all",
    strengths="",
)
NO_FILES = dict(diffusion_model="(none)", text_encoder="(none)", vae="(none)", lora="(none)")


@pytest.fixture(scope="module")
def pack():
    require_comfy_api()
    from comfy.cli_args import args

    args.cpu = True  # as the server is started (--cpu); comfy.model_management picks its device at import
    return SimpleNamespace(
        node=import_pack_module("nodes.preview_node").KleinBasePreviewSampler,
        loading=import_pack_module("klein_core.model.loading"),
        lora=import_pack_module("klein_core.model.lora"),
        text=import_pack_module("klein_core.model.text"),
        history=import_pack_module("klein_core.health.history"),
        train_config=import_pack_module("klein_core.train.config"),
    )


@pytest.fixture(autouse=True)
def comfy_dirs(tmp_path):
    """ComfyUI's output and temp folders in tmp_path, so nothing lands in the ComfyUI tree."""
    import folder_paths

    old = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    yield tmp_path
    folder_paths.set_output_directory(old[0])
    folder_paths.set_temp_directory(old[1])


def random_lora(pack, transformer, seed: int):
    generator = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    return {
        name: (
            torch.randn(4, modules[name].weight.shape[1], generator=generator) * 0.1,
            torch.randn(modules[name].weight.shape[0], 4, generator=generator) * 0.1,
        )
        for name in pack.lora.target_module_names(transformer)
    }


@pytest.fixture(scope="module")
def run(pack, tiny_diffusers, tmp_path_factory):
    """An in-memory run as the trainer hands it over (KLEIN_LORA_RUN): its model, checkpoints and cached embeds."""
    resolved = pack.loading.resolve_model(tiny_diffusers)
    te, tok = pack.loading.load_text_encoder(resolved)
    embeds = pack.text.encode_prompts(te, tok, ["photo of kleinchar", ""])
    transformer = pack.loading.load_transformer(resolved)
    run_dir = tmp_path_factory.mktemp("run")
    history = pack.history.TrainingHistory()
    for step in range(1, 21):
        history.add_training_loss(step, 1.4 - 0.02 * step)
    return SimpleNamespace(
        history=history,
        transformer=transformer,
        vae=pack.loading.load_vae(resolved),
        trigger="kleinchar",
        resolution=SIZE,
        run_dir=run_dir,
        checkpoints=[
            pack.train_config.SavedCheckpoint(
                10, run_dir / "kc_step000010.safetensors", random_lora(pack, transformer, 1)
            ),
            pack.train_config.SavedCheckpoint(
                20, run_dir / "kc_step000020.safetensors", random_lora(pack, transformer, 2)
            ),
        ],
        preview_embeds={"photo of kleinchar": embeds[0], "": embeds[1]},
    )


def test_run_preview_outputs_the_grid_and_every_cell_and_shows_the_grid_on_the_node(pack, run):
    before = {k: v.clone() for k, v in run.transformer.state_dict().items()}
    output = pack.node.execute(run=run, **NO_FILES, **{**COMMON, "width": 0, "height": 0, "strengths": "0.5"})
    grid, cells = output.result
    assert cells.shape == (4, SIZE, SIZE, 3)  # control, step 10, step 20, step 20 at 0.5
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.shape[1] > 4 * SIZE
    ui = output.ui
    assert ui["images"] and "sample_steps 1 is below 30" in ui["text"][0]
    # "looks weak?": the preview settings first, then the loss trend of this run
    assert "If the LoRA looks weak or noisy:\n  1. Check the preview settings first" in ui["text"][0]
    assert "  2. Only if the re-rendered previews still look weak: the training loss is falling" in ui["text"][0]
    assert all(torch.equal(before[k], v) for k, v in run.transformer.state_dict().items())
    assert list((run.run_dir / "previews").glob("*/preview.json"))


def test_cancel_during_a_lora_row_stops_the_preview_and_restores_the_base_weights(pack, run):
    import comfy.model_management as mm
    import comfy.utils

    before = {k: v.clone() for k, v in run.transformer.state_dict().items()}

    def cancel_after_the_control_cell(value, total, preview, node_id=None, **_):
        if preview is not None:  # the finished control cell is shown; the next row merges a LoRA, then is cancelled
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(cancel_after_the_control_cell)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            pack.node.execute(run=run, **NO_FILES, **COMMON)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert all(torch.equal(before[k], v) for k, v in run.transformer.state_dict().items())


def test_standalone_preview_from_comfyui_model_files(pack, tiny_comfy_files, comfy_dirs):
    import folder_paths

    for kind, key in (("diffusion_models", "transformer"), ("text_encoders", "text_encoder"), ("vae", "vae")):
        folder_paths.add_model_folder_path(kind, str(tiny_comfy_files[key].parent))
    output = pack.node.execute(
        diffusion_model=tiny_comfy_files["transformer"].name,
        text_encoder=tiny_comfy_files["text_encoder"].name,
        vae=tiny_comfy_files["vae"].name,
        lora="(none)",
        **{**COMMON, "trigger": "kleinchar", "sample_steps": 30},
    )
    grid, cells = output.result
    assert cells.shape == (1, SIZE, SIZE, 3)  # the base model alone: the control row
    assert "warning" not in output.ui["text"][0]
    assert list((comfy_dirs / "output" / "klein_previews").glob("*/grid.png"))


def test_without_a_run_or_model_files_the_error_names_the_missing_inputs(pack):
    with pytest.raises(ValueError, match="diffusion_model, text_encoder, vae"):
        pack.node.execute(**NO_FILES, **COMMON)


def test_bad_strengths_and_sizes_are_reported_before_running(pack):
    assert "'strong'" in pack.node.validate_inputs(strengths="0.8, strong")
    assert "width 40" in pack.node.validate_inputs(width=40)
    assert "'often'" in pack.node.validate_inputs(checkpoints="often")
    assert pack.node.validate_inputs(width=0, height=64, checkpoints="last 2", strengths="0.6 0.8") is True
