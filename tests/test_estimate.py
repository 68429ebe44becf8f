"""The VRAM/time estimate users see before Run: checked against the published Klein figures (Klein 9B/4B compute
and memory figures) and the real module shapes, and the advice it gives on cards that are too small."""

from __future__ import annotations

import json

import pytest
import torch

from klein_core.cli import main
from klein_core.errors import PlanError
from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG
from klein_core.train import estimate as estimate_module
from klein_core.train.gpu import detect_gpu_memory
from klein_core.train.memory_mode import decide_memory_mode, recommend_mode
from klein_core.train.estimate import (
    CheckpointSettings,
    KLEIN_4B,
    KLEIN_9B,
    Mode,
    ModelShape,
    estimate,
    fits,
    peak_tflops,
)

GC = Mode(gradient_checkpointing=True)


def meta_transformer(shape: ModelShape):
    from diffusers import Flux2Transformer2DModel

    config = dict(
        TINY_TRANSFORMER_CONFIG,
        num_layers=shape.num_layers,
        num_single_layers=shape.num_single_layers,
        num_attention_heads=shape.hidden_size // 128,
        joint_attention_dim=shape.joint_attention_dim,
    )
    with torch.device("meta"):
        return Flux2Transformer2DModel(**config)


@pytest.mark.parametrize(
    "shape", [KLEIN_9B, KLEIN_4B, ModelShape.from_config(TINY_TRANSFORMER_CONFIG)], ids=["9B", "4B", "tiny"]
)
def test_parameter_counts_match_the_real_diffusers_modules(shape):
    model = meta_transformer(shape)
    assert shape.params == sum(p.numel() for p in model.parameters())
    block_linears = [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n
    ]
    assert shape.block_linear_params == sum(m.weight.numel() for m in block_linears)


def test_lora_parameter_count_matches_the_adapter_the_trainer_injects():
    from klein_core.model.lora import add_lora

    model = meta_transformer(KLEIN_4B)
    with torch.device("meta"):
        add_lora(model, rank=16)
    assert KLEIN_4B.lora_params(16) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_published_9b_and_4b_sizes():
    assert KLEIN_9B.effective_params == pytest.approx(6.98e9, rel=1e-3)
    assert KLEIN_4B.effective_params == pytest.approx(3.07e9, rel=1e-3)
    assert estimate("9B").memory.weights == pytest.approx(16.9, abs=0.05)  # GiB in bf16
    assert estimate("4B").memory.weights == pytest.approx(7.2, abs=0.05)


@pytest.mark.parametrize(
    "variant,resolution,forward,no_gc,gc",
    [("9B", 512, 22.7, 47.2, 69.9), ("9B", 1024, 75.5, 167.6, 243.1), ("4B", 1024, 34.8, 79.4, 114.2)],
)
def test_flops_per_training_step_match_the_published_table(variant, resolution, forward, no_gc, gc):
    # The table counts the frozen base only; the rank-16 LoRA adds under 1 %.
    assert estimate(variant, resolution).forward_tflop == pytest.approx(forward, rel=0.005)
    assert estimate(variant, resolution).training_step_tflop == pytest.approx(no_gc, rel=0.01)
    assert estimate(variant, resolution, mode=GC).training_step_tflop == pytest.approx(gc, rel=0.01)
    lora_free = estimate(variant, resolution, rank=1)
    assert lora_free.training_step_tflop == pytest.approx(no_gc, rel=0.004)  # + embedders and proj_out


def test_checkpointing_costs_about_one_more_forward():
    plain, checkpointed = estimate("9B", 1024), estimate("9B", 1024, mode=GC)
    assert plain.training_step_tflop / plain.forward_tflop == pytest.approx(2.2, abs=0.05)
    assert checkpointed.training_step_tflop / checkpointed.forward_tflop == pytest.approx(3.2, abs=0.05)


def test_empty_prompt_preservation_costs_a_base_forward_and_one_more_training_step_but_no_memory():
    """Per micro-batch the term runs the base's forward for the empty prompt (no gradients), then the LoRA's forward
    and backward for it, after the flow-matching loss's backward: the peak stays one training step's."""
    plain, kept = estimate("9B", 1024, mode=GC), estimate("9B", 1024, mode=GC, empty_prompt_preservation=True)
    assert kept.training_step_tflop == pytest.approx(2 * plain.training_step_tflop + plain.forward_tflop)
    assert kept.memory == plain.memory


# Both calibrated to the fit-check audit at 1024 px (tests/test_fitcheck.py): no GC 24.2 GiB (peft's plain fp32 LoRA,
# which published per-block figures describe, keeps a third more), and the inputs every checkpointed block keeps
@pytest.mark.parametrize("resolution,no_gc,gc", [(512, 8.06, 0.85), (768, 14.78, 1.56), (1024, 24.19, 2.56)])
def test_9b_activation_memory_per_resolution(resolution, no_gc, gc):
    assert estimate("9B", resolution).memory.activations == pytest.approx(no_gc, abs=0.1)
    assert estimate("9B", resolution, mode=GC).memory.activations == pytest.approx(gc, abs=0.1)


def test_ideal_h100_seconds_match_the_published_table():
    ideal = estimate("9B", 1024, rank=1, mfu=1.0, device_name="NVIDIA H100 80GB HBM3")
    assert ideal.seconds_per_training_step == pytest.approx(0.212, abs=0.003)
    assert estimate("9B", 1024, rank=1, mode=GC, mfu=1.0).seconds_per_training_step == pytest.approx(0.308, abs=0.003)
    assert ideal.preview_tflop == pytest.approx(7550, rel=0.005)  # 50 sample steps x CFG = 100 forwards
    assert ideal.preview_seconds == pytest.approx(9.6, abs=0.1)


def test_time_scales_with_training_steps_and_assumed_mfu():
    half = estimate("9B", 1024, training_steps=1000, mfu=0.5)
    assert half.training_seconds == pytest.approx(1000 * half.seconds_per_training_step)
    assert estimate("9B", 1024, mfu=0.25).seconds_per_training_step == pytest.approx(2 * half.seconds_per_training_step)
    assert estimate("9B", 1024, grad_accum=4).training_step_tflop == pytest.approx(4 * half.training_step_tflop)


def test_a_24_gib_card_needs_gradient_checkpointing_for_9b_at_1024():
    plain, checkpointed = estimate("9B", 1024), estimate("9B", 1024, mode=GC)
    assert not fits(plain, 24) and fits(checkpointed, 24)
    assert checkpointed.memory.total <= 22  # the goal, so a 24 GB card keeps headroom
    advice = recommend_mode("9B", 1024, 16, 23.6)  # what torch reports for a 24 GB card
    assert advice.mode == GC
    assert "will not fit your 24 GiB GPU without gradient checkpointing" in advice.warning
    assert "use --gradient-checkpointing" in advice.warning


def test_recommendation_keeps_the_fastest_mode_when_it_fits():
    advice = recommend_mode("9B", 1024, 16, 79.1)  # an 80 GB H100
    assert advice.mode == Mode() and advice.warning is None and advice.requested_fits
    assert recommend_mode("4B", 512, 16, 23.6).mode == Mode()


def test_4b_at_1024_fits_a_16_gib_card_in_bf16_with_checkpointing():
    assert recommend_mode("4B", 1024, 16, 15.6).mode == GC


def test_a_16_gib_card_needs_an_8bit_base_for_9b():
    advice = recommend_mode("9B", 1024, 16, 15.6)
    assert advice.mode == Mode(gradient_checkpointing=True, base_8bit=True)
    assert "--base-8bit" in advice.warning and "--gradient-checkpointing" in advice.warning
    assert 12 < advice.fitting.memory.total < 15  # facts: an 8-bit base is comfortable at ~13-14 GiB


def test_nothing_fits_a_tiny_card_and_the_warning_says_what_to_change():
    advice = recommend_mode("9B", 1024, 16, 6)
    assert advice.mode is None
    assert "in any mode" in advice.warning and "resolution" in advice.warning


def test_recommendation_never_drops_a_mode_the_user_asked_for():
    advice = recommend_mode("4B", 512, 16, 79.1, requested=GC)
    assert advice.mode == GC


def test_unknown_values_are_named():
    with pytest.raises(PlanError, match="variant"):
        estimate("12B")
    with pytest.raises(PlanError, match="resolution"):
        estimate("9B", 1000)
    with pytest.raises(PlanError, match="rank"):
        estimate("9B", 1024, rank=0)


def test_device_peaks_are_found_by_name_and_unknown_devices_get_no_time():
    assert peak_tflops("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert peak_tflops("NVIDIA GeForce RTX 4090")[1] == pytest.approx(165.2)
    unknown = estimate("9B", 1024, device_name="Some Future GPU")
    assert unknown.seconds_per_training_step is None and unknown.notes


def test_no_gpu_is_detected_on_a_cpu_machine():
    if torch.cuda.is_available():
        assert detect_gpu_memory() > 0
    else:
        assert detect_gpu_memory() is None


def test_plan_json_has_an_estimate_with_the_fit_on_a_given_gpu(capsys):
    assert (
        main(["plan", "--images", "55", "--variant", "9b", "--resolution", "1024", "--gpu-memory", "23.6", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["training_steps"] == 5500
    est = out["estimate"]
    assert est["variant"] == "9B" and est["resolution"] == 1024 and est["rank"] == 16
    assert est["training_step_tflop"] == pytest.approx(168, abs=1)
    assert est["fits"] is False and est["recommended_mode"] == "bf16 base + gradient checkpointing"
    assert "--gradient-checkpointing" in est["warning"]
    assert est["training_seconds"] == pytest.approx(5500 * est["seconds_per_training_step"])


def test_plan_text_shows_the_estimate_and_the_warning(capsys):
    assert main(["plan", "--images", "20", "--variant", "4B", "--resolution", "512", "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "estimate (4B, 512 px, rank 16" in out and "GiB VRAM" in out
    assert "warning: will not fit your 8 GiB GPU" in out


def test_plan_rejects_a_non_positive_gpu_memory(capsys):
    assert main(["plan", "--images", "20", "--gpu-memory", "0"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err


# --- the trainer's pre-flight ----------------------------------------------------------------------------------------
def test_automatic_checkpointing_turns_on_only_when_the_gpu_needs_it():
    mode, lines, _ = decide_memory_mode("9B", 1024, 16, None, gpu_memory_gib=23.6)
    assert mode.gradient_checkpointing
    assert lines[0].startswith(f"gradient checkpointing: {mode.checkpointed_blocks} of 32 blocks (automatic")
    assert lines[-1].startswith("estimate (9B, 1024 px, rank 16, bf16 base + gradient checkpointing")
    mode, lines, _ = decide_memory_mode("9B", 1024, 16, None, gpu_memory_gib=79.1)
    assert mode == Mode() and len(lines) == 1
    # no GPU detected (CPU): automatic means off, and the estimate is still shown
    mode, lines, _ = decide_memory_mode("9B", 1024, 16, None, gpu_memory_gib=None)
    assert mode == Mode() and lines[-1].startswith("estimate (9B")


def test_automatic_checkpointing_on_a_40gib_card_checkpoints_only_the_blocks_it_must():
    mode, lines, _ = decide_memory_mode("9B", 1024, 16, None, gpu_memory_gib=39.5)
    assert mode.gradient_checkpointing and mode.checkpointed_blocks is not None and mode.checkpointed_blocks <= 10
    assert lines[0].startswith(f"gradient checkpointing: {mode.checkpointed_blocks} of 32 blocks (automatic")
    partial = estimate_module.estimate("9B", 1024, 16, mode)
    every = estimate_module.estimate("9B", 1024, 16, GC)
    assert partial.training_step_tflop < 0.85 * every.training_step_tflop  # most blocks skip the recompute
    assert estimate_module.fits(partial, 39.5)


def test_the_memory_decision_carries_the_estimate_its_last_line_shows_for_the_chosen_mode():
    decision = decide_memory_mode("9B", 1024, 16, None, gpu_memory_gib=47.5, batch_size=2, images=20)
    assert decision.estimate == estimate_module.estimate("9B", 1024, 16, decision.mode, batch_size=2, images=20)
    assert decision.lines[-1] == decision.estimate.summary()


def test_an_explicit_choice_is_kept_and_warned_about():
    mode, lines, _ = decide_memory_mode("9B", 1024, 16, False, gpu_memory_gib=23.6)
    assert not mode.gradient_checkpointing
    assert any(
        line.startswith("warning: this run will not fit your 24 GiB GPU without gradient checkpointing")
        for line in lines
    )


def test_automatic_checkpointing_still_warns_when_only_an_8bit_base_would_fit():
    mode, lines, _ = decide_memory_mode("9B", 1024, 16, None, gpu_memory_gib=15.6)
    assert mode.gradient_checkpointing and mode.checkpointed_blocks is None
    assert any("without an 8-bit base" in line and "--base-8bit" in line for line in lines)


def test_the_8bit_base_always_checkpoints_every_block_and_refuses_to_run_without():
    from klein_core.errors import ConfigError
    from klein_core.train.config import TrainConfig

    mode, lines, _ = decide_memory_mode("9B", 1024, 16, None, base_8bit=True, gpu_memory_gib=79.1)
    assert mode == Mode(True, True) and lines[0] == "gradient checkpointing: on (automatic: the 8-bit base needs it)"
    with pytest.raises(ConfigError, match="the 8-bit base needs gradient checkpointing"):
        TrainConfig(base_8bit=True, gradient_checkpointing=False)


def test_a_config_dict_of_a_known_size_is_named_after_it():
    config = dict(
        TINY_TRANSFORMER_CONFIG, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288
    )
    assert estimate_module.model_shape(config).name == "9B"
    assert estimate_module.model_shape(TINY_TRANSFORMER_CONFIG).name == "custom"


def test_trainer_shows_the_estimate_before_the_first_training_step(
    tiny_diffusers, sample_dataset, tmp_path, training_cache
):
    from conftest import quick_config, quick_spec

    from klein_core.model.loading import resolve_model
    from klein_core.train.config import TrainCallbacks
    from klein_core.train.loop import train

    events: list[str] = []
    callbacks = TrainCallbacks(log=events.append, on_step=lambda info: events.append(f"step {info['training_step']}"))
    result = train(
        resolve_model(tiny_diffusers),
        quick_spec(sample_dataset),
        quick_config(training_steps=1, save_every=0),
        tmp_path,
        callbacks=callbacks,
        cache_dir=training_cache,
    )
    estimates = [i for i, e in enumerate(events) if e.startswith("estimate (")]
    assert estimates and estimates[0] < events.index("step 1")
    assert "GiB VRAM" in events[estimates[0]]
    # on a CPU there is no GPU to fit, so automatic checkpointing stays off
    assert result.manifest["config"]["gradient_checkpointing"] is False


def test_at_the_defaults_every_checkpoint_gets_a_health_preview_within_a_tenth_of_the_training():
    # 9B at 1024 px with the automatic mode of a 24 GiB card, 20 or 50 images, a checkpoint every 250 training steps
    for images in (20, 50):
        work = estimate("9B", 1024, 16, GC, 2000, images=images).checkpoint
        assert work.health_preview_every == 1
        assert work.fraction <= 0.10
    summary = estimate("9B", 1024, 16, GC, images=20).summary()
    assert "checkpoint health work ~8% of the training between checkpoints" in summary


def test_when_previews_would_cost_more_than_a_tenth_they_render_at_every_kth_checkpoint_and_the_line_says_so():
    # 512 px without checkpointing: a training step is cheap, a Base-correct preview (50 sample steps, CFG 4) is not
    every = estimate("9B", 512, 16, Mode(), 250 * 40, images=20).checkpoint
    assert every.health_preview_every > 1 and every.fraction <= 0.10
    assert (
        estimate(
            "9B", 512, 16, Mode(), 250 * 40, images=20, checkpoints=CheckpointSettings(health_preview_every=1)
        ).checkpoint.fraction
        > 0.2
    )
    summary = estimate("9B", 512, 16, Mode(), 250 * 40, images=20).summary()
    assert f"health previews at every {every.health_preview_every}" in summary and "th checkpoint" in summary


def test_a_run_never_previews_fewer_than_four_checkpoints_and_an_explicit_choice_is_kept():
    few = estimate("9B", 512, 16, Mode(), 250 * 8, images=20).checkpoint  # 8 checkpoints
    assert few.health_preview_every == 2 and few.fraction > 0.10  # at most every 2nd: 4 previews stay
    asked = CheckpointSettings(health_preview_every=3)
    assert estimate("9B", 1024, 16, GC, 2000, images=20, checkpoints=asked).checkpoint.health_preview_every == 3
    assert estimate("9B", 1024, 16, GC, 2000, checkpoints=CheckpointSettings(save_every=0)).checkpoint is None


def test_the_trainer_previews_the_kth_checkpoints_and_the_last_one(
    tiny_diffusers, sample_dataset, tmp_path, training_cache
):
    from conftest import quick_config, quick_spec

    from klein_core.model.loading import resolve_model
    from klein_core.train.loop import train

    config = quick_config(training_steps=5, save_every=1, health_preview_every=2, health_sample_steps=2)
    result = train(
        resolve_model(tiny_diffusers),
        quick_spec(sample_dataset),
        config,
        tmp_path,
        preview_prompts=("photo of [trigger]",),
        cache_dir=training_cache,
    )
    records = result.manifest["history"]["checkpoints"]
    previewed = [r["step"] for r in records if r["preview_stats"]]
    assert previewed == [0, 2, 4, 5], "the untrained baseline, every 2nd checkpoint and the final one"
    assert all(r["validation_loss"] is not None for r in records if r["step"] > 0), "validation runs at every one"
