"""The training report chart and verdict: what a user sees after a run (healthy, or collapsed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from klein_core.health.advice import collapse_advice, pick_best_checkpoint
from klein_core.health.collapse import detect_collapse
from klein_core.health.history import TrainingHistory
from klein_core.health.report import (
    BEST_COLOUR,
    COLLAPSE_COLOUR,
    HELD_OUT_COLOUR,
    NON_FINITE_COLOUR,
    SMOOTH_LOSS_COLOUR,
    VALIDATION_COLOUR,
    chart_geometry,
    render_training_report,
    save_training_report,
    verdict_text,
)


def ckpt(step: int) -> str:
    return f"/runs/bob/bob_step{step:06d}.safetensors"


def make_history(collapse: bool, seed: int = 0) -> TrainingHistory:
    rng = np.random.default_rng(seed)
    history = TrainingHistory(likeness_backend="generic image similarity (whole images, not faces)")
    for step in range(1, 801):
        level = 0.25 + 0.3 * math.exp(-step / 150)
        if collapse and step > 500:
            level *= 1 + (step - 500) / 20  # a too-high LR: the loss climbs away
        history.add_training_loss(step, level * float(np.exp(rng.normal(0, 0.3))))
    for step in range(0, 801, 100):
        val = 0.25 + 0.3 * math.exp(-step / 150)
        like = 0.2 + 0.5 * (1 - math.exp(-step / 150))
        if collapse and step > 500:
            val *= 1 + (step - 500) / 50
            like *= 0.4
        history.add_checkpoint(step, ckpt(step) if step else None, val, likeness=like)
    return history


def column_count(image: Image.Image, x: int, colour, top: int, bottom: int) -> int:
    pixels = np.asarray(image)[top:bottom, x]
    return int(np.all(pixels == np.asarray(colour, dtype=np.uint8), axis=1).sum())


def colour_present(image: Image.Image, colour) -> bool:
    return bool(np.all(np.asarray(image) == np.asarray(colour, dtype=np.uint8), axis=-1).any())


def test_collapsed_run_chart_marks_where_collapse_began_and_the_best_checkpoint():
    history = make_history(collapse=True)
    report = detect_collapse(history)
    assert report is not None
    best = pick_best_checkpoint(history, report)
    image = render_training_report(history, report, best, width=900, height=600)
    assert image.size == (900, 600) and image.mode == "RGB"

    geo = chart_geometry(history, 900, 600)
    x = geo.x_of(report.began_step)
    loss_height = geo.loss_bottom - geo.loss_top
    like_height = geo.likeness_bottom - geo.likeness_top
    # The collapse line runs through both panels (the loss curves may cross it at a few pixels).
    assert column_count(image, x, COLLAPSE_COLOUR, geo.loss_top, geo.loss_bottom) > 0.8 * loss_height
    assert column_count(image, x, COLLAPSE_COLOUR, geo.likeness_top, geo.likeness_bottom) > 0.8 * like_height
    # The best checkpoint is a dashed green line: about half of its column.
    best_x = geo.x_of(best.step)
    assert best.step < report.began_step and best_x < x
    assert column_count(image, best_x, BEST_COLOUR, geo.likeness_top, geo.likeness_bottom) > 0.3 * like_height
    # Nowhere else is a column of the collapse colour.
    other = geo.x_of(100)
    assert column_count(image, other, COLLAPSE_COLOUR, geo.loss_top, geo.loss_bottom) < 10


def test_healthy_run_chart_has_curves_and_no_collapse_marker():
    history = make_history(collapse=False)
    report = detect_collapse(history)
    assert report is None
    best = pick_best_checkpoint(history, None)
    image = render_training_report(history, None, best)
    assert image.size == (1000, 640)
    assert not colour_present(image, COLLAPSE_COLOUR)
    for colour in (SMOOTH_LOSS_COLOUR, VALIDATION_COLOUR, BEST_COLOUR):
        assert colour_present(image, colour), colour


def test_held_out_validation_loss_gets_its_own_line_only_when_there_are_held_out_images():
    history = make_history(collapse=False)
    assert not colour_present(render_training_report(history, None, None), HELD_OUT_COLOUR)
    for c in history.checkpoints:
        c.held_out_loss = (c.validation_loss or 0.3) * 1.1
    assert colour_present(render_training_report(history, None, None), HELD_OUT_COLOUR)


def test_chart_draws_non_finite_losses_and_survives_an_empty_history():
    history = make_history(collapse=False)
    history.losses[300] = float("nan")
    image = render_training_report(history, detect_collapse(history), None)
    assert colour_present(image, NON_FINITE_COLOUR)
    empty = render_training_report(TrainingHistory(), None, None, width=400, height=300)
    assert empty.size == (400, 300)


def test_a_report_write_killed_midway_leaves_the_previous_report_whole_and_no_partial_file(tmp_path, monkeypatch):
    history = make_history(collapse=False)
    image = render_training_report(history, None, pick_best_checkpoint(history, None))
    path = save_training_report(image, tmp_path / "run" / "training_report.png")
    before = path.read_bytes()
    assert Image.open(path).size == image.size

    def killed_while_writing(self, fp, *args, **kwargs):
        with open(fp, "wb") as out:
            out.write(before[: len(before) // 2])  # half a PNG on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_training_report(render_training_report(make_history(collapse=True), None, None), path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["training_report.png"]  # no partial file left


def test_verdict_for_a_collapse_names_the_start_last_good_checkpoint_and_ordered_advice():
    history = make_history(collapse=True)
    report = detect_collapse(history)
    best = pick_best_checkpoint(history, report)
    advice = collapse_advice(report, learning_rate=1e-4, rank=32, has_regularization=False)
    text = verdict_text(history, report, best, advice)
    assert text.startswith(f"Collapse detected: it began at training step {report.began_step}")
    assert f"Last good checkpoint: step {report.last_good_step}, {report.last_good_path}" in text
    positions = [text.index(item) for item in advice]
    assert positions == sorted(positions) and "LR 1e-4 → 5e-5" in text and "rank 32 → 16" in text
    assert f"Best checkpoint: step {best.step}" in text


def test_verdict_for_a_healthy_run_says_so():
    history = make_history(collapse=False)
    best = pick_best_checkpoint(history, None)
    text = verdict_text(history, None, best, best_copy="run/klein_lora_best.safetensors")
    assert text.startswith("Healthy: no collapse signal over 800 training-loss readings to step 800")
    assert best.path in text and text.endswith("copied to run/klein_lora_best.safetensors.")


@pytest.mark.parametrize("width, height", [(640, 420), (1600, 900)])
def test_chart_respects_the_requested_size(width, height):
    history = make_history(collapse=True)
    report = detect_collapse(history)
    image = render_training_report(history, report, pick_best_checkpoint(history, report), width=width, height=height)
    assert image.size == (width, height)
