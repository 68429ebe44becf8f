"""``klein-lora demo``: uses the shipped pre-trained tiny Klein, makes (or reuses) the identity pictures, plans, trains
with health previews, renders the grid with a control row, scores every row and says where every file is. Run here
at a toy dose so it takes seconds; the real demo's numbers are in ``DemoScale`` and its output is in the README."""

from __future__ import annotations

import json

from klein_core.cli import build_parser
from klein_core.preset import PRESET
from klein_core.tools.demo import DATASET_FOLDER, PART_COLOUR_LABEL, DemoScale, run_demo
from klein_core.tools.pretrain import SHIPPED_FOLDER
from klein_core.tools.world import identity_file_names

# S = 2*5/1 = 10 training steps, checkpoints at 5 and 10, each with a 2-step health preview
TOY = DemoScale(images=2, target_repeats=5, sample_steps=2, score_seeds=2, step_checkpoints=2)


def test_demo_plans_trains_previews_scores_and_says_where_everything_is(tmp_path):
    out = tmp_path / "demo"
    lines: list[str] = []
    result = run_demo(out, TOY, log=lines.append)
    text = "\n".join(lines)

    assert "the pre-trained tiny Klein Base" in text and "made 2 pictures of kleinchar" in text
    assert result.model_dir.is_relative_to(SHIPPED_FOLDER)
    assert "N=2 images, R=5, B=1, G=1 -> S=10 training steps" in text
    assert "repeats per image 5.0 -> band: under-trained" in text and "health previews on" in text
    assert result.plan["training_steps"] == 10
    assert result.verdict.splitlines()[0] in text  # the health verdict is shown
    assert "warning: sample_steps 2 is below 30" in text  # under-sampled previews are called out, as in the CLI
    for path in (result.final_lora, result.best_lora, result.grid, result.health_report, result.manifest):
        assert path is not None and path.is_file() and path.is_relative_to(out)
    listing = json.loads(result.preview_listing.read_text())
    assert listing["rows"][0] == "step 0: no LoRA (control)" and len(listing["rows"]) == 1 + TOY.step_checkpoints
    assert {c["seed"] for c in listing["cells"]} == {TOY.seed}
    assert json.loads(result.manifest.read_text())["plan"]["repeats_per_image"] == 5.0
    assert [s.training_step for s in result.scores] == [0, 5, 10]
    assert all(s.likeness is not None for s in result.scores)  # the health monitor scores the untrained base too
    assert result.likeness_backend and PART_COLOUR_LABEL in text
    assert result.control_distance > 0 and result.lora_distance > 0

    again: list[str] = []
    run_demo(out, TOY, log=again.append)
    assert any("reusing 2 pictures of kleinchar" in line for line in again)
    # nothing but the generated images and captions is ever written into the dataset folder
    assert {p.name for p in (out / DATASET_FOLDER).iterdir()} == {n for pair in identity_file_names(2) for n in pair}


def test_the_demo_keeps_the_preset_dose_health_previews_and_base_preview_settings():
    scale = DemoScale()
    assert (scale.target_repeats, scale.batch_size, scale.grad_accum, scale.rank) == (
        PRESET.target_repeats,
        PRESET.batch_size,
        PRESET.grad_accum,
        PRESET.rank,
    )
    assert (scale.sample_steps, scale.cfg) == (PRESET.sample_steps, PRESET.cfg) == (50, 4.0)
    assert scale.health_previews
    assert build_parser().parse_args(["demo"]).out == "klein-demo"
