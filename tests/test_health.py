"""Training health: collapse signals, the guide's ordered advice, weak-LoRA diagnosis and best-checkpoint choice.

Histories here are synthetic but shaped like real runs: a flow-matching training loss is noisy per step (each step
draws its own σ), so "normal" runs carry heavy multiplicative noise and must never raise an alarm.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from klein_core.health.advice import (
    collapse_advice,
    diagnose_weak_lora,
    format_learning_rate,
    non_finite_loss_message,
    pick_best_checkpoint,
)
from klein_core.health.collapse import (
    LIKENESS_DROP,
    PREVIEW_BLOWOUT,
    TRAINING_LOSS_DIVERGING,
    TRAINING_LOSS_NON_FINITE,
    TRAINING_LOSS_SPIKES,
    VALIDATION_LOSS_RISING,
    CollapseThresholds,
    detect_collapse,
)
from klein_core.health.history import TrainingHistory
from klein_core.health.stats import preview_statistics
from klein_core.preset import PRESET

CHECKPOINT_EVERY = 50


def ckpt_path(step: int) -> str:
    return f"/runs/alice/alice_step{step:06d}.safetensors"


def photo_like_previews(rng: np.random.Generator, count: int = 2, side: int = 64, scene: int = 0) -> list[np.ndarray]:
    """Smooth, photo-like images: colour gradients, a face-sized blob and mild sensor noise.

    Like fixed-seed previews of one run, the images of every checkpoint show the same ``scene`` with small changes.
    """
    scene_rng = np.random.default_rng(10_000 + scene)
    yy, xx = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(count):
        base = scene_rng.uniform(0.3, 0.6, size=3) + rng.normal(0, 0.03, size=3)
        slope = scene_rng.uniform(-0.3, 0.3, size=(2, 3)) + rng.normal(0, 0.03, size=(2, 3))
        img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
        cx, cy = scene_rng.uniform(0.35, 0.65, size=2) + rng.normal(0, 0.03, size=2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.03)[..., None] * scene_rng.uniform(-0.35, 0.35, size=3)
        img = img + blob + rng.normal(0, 0.01, size=img.shape)
        images.append(np.clip(img, 0, 1).astype(np.float32))
    return images


def normal_run(seed: int, training_steps: int = 600, with_previews: bool = True) -> TrainingHistory:
    """A healthy run: the loss falls and plateaus under heavy per-step noise; likeness rises and saturates."""
    rng = np.random.default_rng(seed)
    history = TrainingHistory(likeness_backend="test")
    for step in range(1, training_steps + 1):
        trend = 0.25 + 0.35 * math.exp(-step / 150)
        history.add_training_loss(step, trend * float(np.exp(rng.normal(0.0, 0.35))))
    for step in range(0, training_steps + 1, CHECKPOINT_EVERY):
        val = 0.25 + 0.35 * math.exp(-step / 150) + rng.normal(0, 0.004)
        likeness = 0.2 + 0.5 * (1 - math.exp(-step / 120)) + rng.normal(0, 0.02)
        stats = preview_statistics(photo_like_previews(rng, scene=seed)) if with_previews else None
        history.add_checkpoint(step, None if step == 0 else ckpt_path(step), val, stats, likeness)
    return history


# --------------------------------------------------------------------------------------------------------------------
# No false alarms
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_noisy_but_falling_run_raises_no_alarm(seed):
    history = normal_run(seed)
    assert detect_collapse(history) is None


def test_heavier_tailed_loss_noise_still_raises_no_alarm():
    # Five long runs with noise as wide as a batch-1 flow-matching loss gets (σ of log-loss 0.5).
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        history = TrainingHistory()
        for step in range(1, 3001):
            history.add_training_loss(step, (0.3 + 0.3 * math.exp(-step / 500)) * float(np.exp(rng.normal(0, 0.5))))
        assert detect_collapse(history) is None, seed


# --------------------------------------------------------------------------------------------------------------------
# Each signal
# --------------------------------------------------------------------------------------------------------------------


def test_validation_loss_rising_after_its_minimum_is_flagged_at_the_first_worse_checkpoint():
    history = TrainingHistory()
    vals = [1.0, 0.8, 0.65, 0.55, 0.5, 0.7, 0.9, 1.2, 1.5]
    for i, v in enumerate(vals):
        history.add_checkpoint(i * CHECKPOINT_EVERY, None if i == 0 else ckpt_path(i * CHECKPOINT_EVERY), v)
    report = detect_collapse(history)
    assert report is not None
    assert report.signal_names == [VALIDATION_LOSS_RISING]
    assert report.began_step == 250  # the first checkpoint after the minimum at step 200
    assert (report.last_good_step, report.last_good_path) == (200, ckpt_path(200))
    assert report.detected_step == 300  # smoothing waits for a second bad checkpoint to be sure


def test_held_out_validation_loss_rising_is_flagged_while_the_training_images_loss_still_falls():
    history = TrainingHistory()
    train_vals = [1.0, 0.8, 0.65, 0.55, 0.5, 0.45, 0.42, 0.4, 0.38]  # memorising the training images
    held_vals = [1.0, 0.85, 0.75, 0.72, 0.9, 1.1, 1.3, 1.5, 1.7]  # while the held-out photos get worse
    for i, (v, h) in enumerate(zip(train_vals, held_vals)):
        history.add_checkpoint(
            i * CHECKPOINT_EVERY, None if i == 0 else ckpt_path(i * CHECKPOINT_EVERY), v, held_out_loss=h
        )
    report = detect_collapse(history)
    assert report is not None and report.signal_names == [VALIDATION_LOSS_RISING]
    assert report.began_step == 200 and report.last_good_step == 150
    assert report.signals[0].detail.startswith("smoothed held-out validation loss rose")


def test_single_mild_validation_wobble_is_not_a_collapse():
    history = TrainingHistory()
    for i, v in enumerate([1.0, 0.8, 0.65, 0.6, 0.62, 0.59, 0.61, 0.58]):
        history.add_checkpoint(i * CHECKPOINT_EVERY, ckpt_path(i * CHECKPOINT_EVERY), v)
    assert detect_collapse(history) is None


def test_validation_rise_needs_the_documented_minimum_of_checkpoints():
    history = TrainingHistory()
    history.add_checkpoint(50, ckpt_path(50), 0.5)
    history.add_checkpoint(100, ckpt_path(100), 0.9)
    assert detect_collapse(history) is None
    history.add_checkpoint(150, ckpt_path(150), 1.2)
    assert detect_collapse(history).began_step == 100


def test_nan_training_loss_is_flagged_at_its_step():
    history = normal_run(0, training_steps=300, with_previews=False)
    history.losses[149] = float("nan")  # training step 150
    report = detect_collapse(history)
    assert report is not None and report.non_finite
    assert TRAINING_LOSS_NON_FINITE in report.signal_names
    assert report.began_step == 150
    assert (report.last_good_step, report.last_good_path) == (100, ckpt_path(100))


def test_infinite_training_loss_is_flagged_too():
    history = TrainingHistory()
    for step in range(1, 30):
        history.add_training_loss(step, 0.5)
    history.add_training_loss(30, float("inf"))
    assert detect_collapse(history).began_step == 30


def test_loss_spikes_are_flagged_where_they_began():
    history = normal_run(1, training_steps=400, with_previews=False)
    for step in (230, 233, 236, 240, 250):
        history.losses[step - 1] *= 15.0
    report = detect_collapse(history)
    assert report is not None
    assert TRAINING_LOSS_SPIKES in report.signal_names
    spike = next(s for s in report.signals if s.name == TRAINING_LOSS_SPIKES)
    assert spike.began_step == 230 and spike.detected_step == 236  # three spikes within 25 readings
    assert report.last_good_step == 200


def test_a_single_moderate_spike_is_not_a_collapse():
    history = normal_run(2, training_steps=400, with_previews=False)
    history.losses[199] *= 6.0
    assert detect_collapse(history) is None


def test_one_extreme_spike_is_flagged_on_its_own():
    history = normal_run(3, training_steps=400, with_previews=False)
    history.losses[299] = 1000.0
    report = detect_collapse(history)
    assert report is not None and report.began_step == 300


def test_loss_diverging_to_a_higher_level_is_flagged():
    # What a too-high LR does: the loss jumps to a new, much higher level and stays there.
    history = normal_run(4, training_steps=300, with_previews=False)
    rng = np.random.default_rng(4)
    for step in range(301, 401):
        history.add_training_loss(step, 3.0 * float(np.exp(rng.normal(0, 0.3))))
    report = detect_collapse(history)
    assert report is not None and report.began_step <= 305


def test_loss_settling_at_a_several_times_higher_level_is_flagged_as_divergence():
    # No single reading is a spike, but the loss has moved to 3× its level: the rolling median gives it away.
    rng = np.random.default_rng(8)
    history = TrainingHistory()
    for step in range(1, 401):
        level = 0.3 if step <= 300 else 0.9
        history.add_training_loss(step, level * float(np.exp(rng.normal(0, 0.3))))
    report = detect_collapse(history)
    assert report is not None and report.signal_names == [TRAINING_LOSS_DIVERGING]
    assert 301 <= report.began_step <= 310
    assert report.detected_step <= 350  # once most of the 50-reading window is at the new level


def test_two_spikes_are_not_enough_to_call_a_collapse():
    history = normal_run(9, training_steps=400, with_previews=False)
    for step in (230, 240):
        history.losses[step - 1] *= 15.0
    assert detect_collapse(history) is None


@pytest.mark.parametrize(
    "blowout, expected_word",
    [
        ("saturated", "clipped"),
        ("noise", "high-frequency"),
        ("flat", "colour collapse"),
    ],
)
def test_preview_blowout_is_flagged_at_its_checkpoint(blowout, expected_word):
    rng = np.random.default_rng(7)
    history = TrainingHistory()
    for step in (0, 100, 200, 300):
        stats = preview_statistics(photo_like_previews(rng))
        history.add_checkpoint(step, ckpt_path(step) if step else None, preview_stats=stats)
    side = 64
    if blowout == "saturated":
        bad = [(rng.random((side, side, 3)) > 0.5).astype(np.float32) for _ in range(2)]  # neon 0/1 colours
    elif blowout == "noise":
        bad = [np.clip(img + rng.normal(0, 0.25, img.shape), 0, 1) for img in photo_like_previews(rng)]
    else:
        bad = [np.full((side, side, 3), 0.5, np.float32) + rng.normal(0, 0.002, (side, side, 3)) for _ in range(2)]
    history.add_checkpoint(400, ckpt_path(400), preview_stats=preview_statistics(bad))
    report = detect_collapse(history)
    assert report is not None
    assert report.signal_names == [PREVIEW_BLOWOUT]
    assert report.began_step == 400 and report.last_good_step == 300
    assert expected_word in report.signals[0].detail


def test_a_blown_out_first_checkpoint_is_judged_against_the_untrained_base_preview():
    rng = np.random.default_rng(3)
    history = TrainingHistory()
    history.add_checkpoint(0, None, preview_stats=preview_statistics(photo_like_previews(rng)))  # step 0: the base
    flat = [np.full((64, 64, 3), 1.0, np.float32) for _ in range(2)]  # one clipped colour, as LR 100 gives at step 4
    history.add_checkpoint(4, ckpt_path(4), preview_stats=preview_statistics(flat))
    report = detect_collapse(history)
    assert report is not None and report.signal_names == [PREVIEW_BLOWOUT]
    assert report.began_step == 4 and report.last_good_path is None  # no saved checkpoint is good: say so
    assert pick_best_checkpoint(history, report) is None


def likeness_history(series: list[float], every: int) -> TrainingHistory:
    """Checkpoints every ``every`` training steps with these likenesses; step 0 is the untrained base (no file)."""
    history = TrainingHistory()
    for i, like in enumerate(series):
        history.add_checkpoint(i * every, ckpt_path(i * every) if i else None, likeness=like)
    return history


def test_the_untrained_base_likeness_is_a_baseline_not_a_peak_to_fall_from():
    history = likeness_history([0.6, 0.3, 0.35, 0.4, 0.45], every=100)  # step 0 = the base model, before any LoRA
    assert detect_collapse(history) is None


def test_likeness_dropping_after_its_peak_is_flagged():
    history = likeness_history([0.2, 0.5, 0.7, 0.72, 0.5, 0.3], every=100)
    report = detect_collapse(history)
    assert report is not None and report.signal_names == [LIKENESS_DROP]
    assert report.began_step == 400 and report.last_good_path == ckpt_path(300)


def test_a_likeness_drop_is_still_seen_when_old_checkpoint_files_were_pruned():
    history = TrainingHistory()
    for i, like in enumerate([0.2, 0.5, 0.7, 0.72, 0.5, 0.3]):
        kept = i >= 4  # keep_last 2: the earlier files are gone, their scores stay in the history
        history.add_checkpoint(i * 100, ckpt_path(i * 100) if kept else None, likeness=like)
    report = detect_collapse(history)
    assert report is not None and report.signal_names == [LIKENESS_DROP] and report.began_step == 400


def test_a_sudden_likeness_fall_held_for_two_checkpoints_is_flagged_at_once():
    """An earlier tiny Klein's 30x-LR run: 0.80 -> 0.53, 0.54. The smoothed likeness is only 22% down by then; both
    checkpoints after the fall are 30% below the smoothed peak."""
    history = likeness_history([0.74, 0.71, 0.72, 0.74, 0.80, 0.53, 0.54], every=50)
    report = detect_collapse(history)
    assert report is not None and report.signal_names == [LIKENESS_DROP]
    assert report.began_step == 250 and report.detected_step == 300 and report.last_good_path == ckpt_path(200)


def test_a_likeness_that_falls_from_above_the_untrained_base_to_under_it_is_flagged():
    """The shipped tiny Klein's 30x-LR run: the generic likeness rose from the base's 0.568 to 0.636 and fell to
    0.507, 0.515: only 17% below the smoothed peak, but under what the untrained base drew. The near-equal checkpoint
    after the best (0.633) is not where the fall began."""
    history = likeness_history([0.568, 0.564, 0.572, 0.636, 0.633, 0.507, 0.515], every=50)
    report = detect_collapse(history)
    assert report is not None and report.signal_names == [LIKENESS_DROP]
    assert report.began_step == 250 and report.detected_step == 300 and report.last_good_path == ckpt_path(200)
    assert "under the untrained base's 0.568" in report.signals[0].detail


def test_one_bad_preview_between_good_ones_is_not_a_likeness_drop():
    history = likeness_history([0.74, 0.71, 0.72, 0.74, 0.80, 0.60, 0.79, 0.80], every=50)
    assert detect_collapse(history) is None


def test_small_likeness_wobble_is_not_a_drop():
    history = TrainingHistory()
    for i, like in enumerate([0.2, 0.5, 0.7, 0.72, 0.66, 0.71, 0.68]):
        history.add_checkpoint(i * 100, ckpt_path(i * 100), likeness=like)
    assert detect_collapse(history) is None


def test_collapse_begins_at_the_earliest_signal_and_lists_all_that_fired():
    history = normal_run(5, training_steps=400, with_previews=False)
    history.losses[259] = float("nan")
    for c in history.checkpoints:
        if c.step >= 300:
            c.likeness = 0.05
    report = detect_collapse(history)
    assert report.began_step == 260
    assert set(report.signal_names) >= {TRAINING_LOSS_NON_FINITE, LIKENESS_DROP}
    assert report.last_good_step == 250


def test_collapse_before_any_saved_checkpoint_has_no_last_good():
    history = TrainingHistory()
    history.add_checkpoint(0, None)
    for step in range(1, 10):
        history.add_training_loss(step, float("nan") if step == 5 else 0.5)
    report = detect_collapse(history)
    assert report.last_good_path is None and report.last_good_step is None
    assert "no checkpoint was saved" in collapse_advice(report, 1e-4, 16, False)[3]


def test_thresholds_are_configurable():
    history = TrainingHistory()
    for i, v in enumerate([0.6, 0.6, 0.6, 0.66, 0.68]):
        history.add_checkpoint(i * 100, ckpt_path(i * 100), v)
    assert detect_collapse(history) is None  # a 9 % smoothed rise is under the default 20 %
    assert detect_collapse(history, CollapseThresholds(validation_rise_fraction=0.05)) is not None


# --------------------------------------------------------------------------------------------------------------------
# Preview statistics
# --------------------------------------------------------------------------------------------------------------------


def test_preview_statistics_separate_photo_noise_and_flat_images():
    rng = np.random.default_rng(0)
    photo = preview_statistics(photo_like_previews(rng))
    noise = preview_statistics([rng.random((64, 64, 3)).astype(np.float32)])
    flat = preview_statistics([np.full((64, 64, 3), 0.4, np.float32)])
    assert photo.high_frequency_energy < 0.1 < 0.8 < noise.high_frequency_energy < 1.2  # ≈1 for white noise
    assert flat.colour_std == pytest.approx(0.0, abs=1e-4) and flat.dominant_colour_fraction == 1.0
    assert photo.clipped_fraction < 0.02


def test_preview_statistics_accept_pil_uint8_and_batches():
    from PIL import Image

    rng = np.random.default_rng(1)
    img = photo_like_previews(rng, count=1)[0]
    as_uint8 = (img * 255 + 0.5).astype(np.uint8)
    from_float = preview_statistics(img)
    from_pil = preview_statistics(Image.fromarray(as_uint8))
    from_batch = preview_statistics(np.stack([img, img]))
    assert from_pil.colour_std == pytest.approx(from_float.colour_std, abs=2e-3)
    assert from_batch.image_count == 2 and from_batch.colour_std == pytest.approx(from_float.colour_std)


def test_preview_statistics_accept_a_comfyui_image_batch_tensor():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    images = photo_like_previews(rng, count=3)
    batch = torch.from_numpy(np.stack(images))  # ComfyUI IMAGE: B x H x W x C floats in [0, 1]
    assert preview_statistics(batch) == preview_statistics(images)


# --------------------------------------------------------------------------------------------------------------------
# Advice
# --------------------------------------------------------------------------------------------------------------------


def collapsed_history() -> TrainingHistory:
    history = TrainingHistory()
    for i, v in enumerate([1.0, 0.8, 0.65, 0.55, 0.5, 0.7, 0.9, 1.2]):
        history.add_checkpoint(i * 250, ckpt_path(i * 250) if i else None, v, likeness=None)
    return history


def test_collapse_advice_gives_the_seeds_four_steps_in_order_with_this_runs_values():
    report = detect_collapse(collapsed_history())
    advice = collapse_advice(report, learning_rate=1e-4, rank=32, has_regularization=False)
    assert len(advice) == 4
    assert advice[0].startswith("1. Lower the learning rate") and "LR 1e-4 → 5e-5" in advice[0]
    assert advice[1].startswith("2.") and "rank 32 → 16" in advice[1]
    assert advice[2].startswith("3.") and "regularization set" in advice[2]
    assert f"{PRESET.regularization_weight:g}" in advice[2]
    assert advice[3].startswith("4. Stop early") and ckpt_path(1000) in advice[3] and "step 1000" in advice[3]


def test_advice_halves_an_lr_that_is_not_the_preset_and_keeps_a_rank_of_16():
    report = detect_collapse(collapsed_history())
    advice = collapse_advice(report, learning_rate=3e-4, rank=16, has_regularization=True)
    assert "LR 3e-4 → 1.5e-4" in advice[0]
    assert "rank is already 16" in advice[1]
    assert "already mixes in a regularization set" in advice[2]


def test_non_finite_loss_message_starts_with_the_lr_advice():
    message = non_finite_loss_message(step=37, learning_rate=1e-4)
    assert message.startswith("Lower the learning rate (LR 1e-4 → 5e-5)")
    assert "training step 37" in message


def test_learning_rates_are_written_the_way_people_write_them():
    assert [format_learning_rate(v) for v in (1e-4, 5e-5, 2.5e-5, 3e-4)] == ["1e-4", "5e-5", "2.5e-5", "3e-4"]


# --------------------------------------------------------------------------------------------------------------------
# Weak-LoRA diagnosis
# --------------------------------------------------------------------------------------------------------------------

FALLING = [0.6 - 0.3 * i / 99 for i in range(100)]
FLAT = [0.5 + 0.01 * ((-1) ** i) for i in range(100)]


@pytest.mark.parametrize("sample_steps, cfg", [(20, 4.0), (50, 1.0), (8, 1.0)])
def test_weak_lora_diagnosis_points_at_base_preview_settings_before_more_training(sample_steps, cfg):
    messages = diagnose_weak_lora(FALLING, sample_steps=sample_steps, cfg=cfg)
    assert messages[0].startswith("Check the preview settings first")
    assert f"about {PRESET.sample_steps} sample steps and CFG about {PRESET.cfg:g}" in messages[0]
    assert "train longer" not in messages[0]
    assert messages[1].startswith("Only if the re-rendered previews still look weak")
    assert "train longer" in messages[1]


def test_weak_lora_with_base_correct_previews_and_falling_loss_says_train_longer():
    messages = diagnose_weak_lora(FALLING, sample_steps=PRESET.sample_steps, cfg=PRESET.cfg)
    assert len(messages) == 1 and "train longer" in messages[0] and "preview settings" not in messages[0]


def test_weak_lora_with_flat_loss_says_check_the_data_not_more_training():
    messages = diagnose_weak_lora(FLAT, sample_steps=50, cfg=4.0)
    assert "not falling" in messages[0] and "trigger" in messages[0]


def test_weak_lora_diagnosis_skips_base_settings_check_for_non_base():
    assert not diagnose_weak_lora(FALLING, sample_steps=4, cfg=1.0, is_base=False)[0].startswith("Check the preview")


# --------------------------------------------------------------------------------------------------------------------
# Best checkpoint
# --------------------------------------------------------------------------------------------------------------------


def test_best_checkpoint_is_the_highest_likeness_before_the_collapse():
    history = TrainingHistory(likeness_backend="face similarity")
    data = [(100, 0.8, 0.3), (200, 0.6, 0.6), (300, 0.5, 0.7), (400, 0.55, 0.65), (500, 1.5, 0.2), (600, 2.5, 0.1)]
    for step, val, like in data:
        history.add_checkpoint(step, ckpt_path(step), val, likeness=like)
    report = detect_collapse(history)
    assert report is not None and report.began_step == 400
    best = pick_best_checkpoint(history, report)
    assert (best.step, best.path, best.metric) == (300, ckpt_path(300), "likeness")
    assert "highest likeness (0.700, face similarity)" in best.reason
    assert "before the collapse at step 400" in best.reason


def test_collapsed_checkpoints_are_excluded_even_with_a_higher_likeness():
    history = TrainingHistory()
    for step, like in [(100, 0.4), (200, 0.5), (300, 0.9)]:
        history.add_checkpoint(step, ckpt_path(step), likeness=like)
    history.add_training_loss(250, float("nan"))
    report = detect_collapse(history)
    assert pick_best_checkpoint(history, report).step == 200
    assert pick_best_checkpoint(history, None).step == 300


def test_best_checkpoint_falls_back_to_validation_loss_without_likeness():
    history = TrainingHistory()
    for step, val in [(100, 0.8), (200, 0.5), (300, 0.55), (400, 0.52)]:
        history.add_checkpoint(step, ckpt_path(step), val)
    best = pick_best_checkpoint(history, detect_collapse(history))
    assert (best.step, best.metric) == (200, "validation_loss")
    assert "lowest validation loss" in best.reason and "no likeness" in best.reason


def test_without_likeness_the_held_out_loss_picks_the_best_checkpoint_over_the_training_images_loss():
    history = TrainingHistory()
    for step, val, held in [(100, 0.8, 0.9), (200, 0.5, 0.7), (300, 0.45, 0.75), (400, 0.42, 0.8)]:
        history.add_checkpoint(step, ckpt_path(step), val, held_out_loss=held)
    best = pick_best_checkpoint(history, None)
    assert (best.step, best.metric) == (200, "held_out_loss")
    assert "lowest held-out validation loss (0.7)" in best.reason


def test_best_checkpoint_never_picks_the_no_lora_control():
    history = TrainingHistory()
    history.add_checkpoint(0, None, 0.1, likeness=0.99)
    history.add_checkpoint(100, ckpt_path(100), 0.5, likeness=0.3)
    assert pick_best_checkpoint(history, None).step == 100


def test_no_best_checkpoint_when_everything_collapsed():
    history = TrainingHistory()
    history.add_training_loss(10, float("nan"))
    history.add_checkpoint(50, ckpt_path(50), 0.5)
    assert pick_best_checkpoint(history, detect_collapse(history)) is None


# --------------------------------------------------------------------------------------------------------------------
# run.json
# --------------------------------------------------------------------------------------------------------------------


def test_history_and_report_round_trip_through_strict_json():
    history = normal_run(6, training_steps=200)
    history.losses[120] = float("nan")
    report = detect_collapse(history)
    best = pick_best_checkpoint(history, report)
    payload = {
        "history": history.as_dict(),
        "collapse": report.as_dict(),
        "best": best.as_dict(),
        "thresholds": CollapseThresholds().as_dict(),
    }
    text = json.dumps(payload, allow_nan=False)  # the browser's JSON.parse rejects NaN
    restored = TrainingHistory.from_dict(json.loads(text)["history"])
    assert math.isnan(restored.losses[120])
    assert restored.checkpoints == history.checkpoints
    assert detect_collapse(restored) == report
    collapse = json.loads(text)["collapse"]
    assert collapse["step"] == report.began_step and collapse["last_good_checkpoint"] == report.last_good_path


def test_training_loss_steps_must_increase():
    history = TrainingHistory()
    history.add_training_loss(5, 0.5)
    with pytest.raises(ValueError, match="step 5 after 5"):
        history.add_training_loss(5, 0.4)
