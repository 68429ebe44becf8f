"""Base sampling: our previews equal the diffusers Klein pipeline, our sigma grid equals ComfyUI's Flux2 scheduler,
and under-sampled Base settings are called out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from klein_core.facts import image_tokens as image_token_count
from klein_core.facts import sampling_shift_mu as compute_empirical_mu
from klein_core.model.text import encode_prompts
from klein_core.preset import PRESET
from klein_core.preview.sampling import (
    PreviewError,
    SamplingInterrupted,
    base_sigmas,
    denoise_base,
    sample_base,
    sample_warnings,
    vae_latents,
)

WIDTH, HEIGHT = 64, 48  # not square, so width and height cannot be swapped unnoticed
SAMPLE_STEPS = 4
CFG = 4.0
SEED = 3
PIPELINE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pipe(tiny_diffusers):
    from diffusers import Flux2KleinPipeline

    pipeline = Flux2KleinPipeline.from_pretrained(tiny_diffusers, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def embeds(pipe):
    prompts = encode_prompts(pipe.text_encoder, pipe.tokenizer, ["photo of kleinchar", "a red hat in the city"])
    negative = encode_prompts(pipe.text_encoder, pipe.tokenizer, [""])
    return prompts, negative


def _pipeline(pipe, prompt, output_type, cfg=CFG, sample_steps=SAMPLE_STEPS, width=WIDTH, height=HEIGHT, seed=SEED):
    return pipe(
        prompt=prompt,
        width=width,
        height=height,
        num_inference_steps=sample_steps,
        guidance_scale=cfg,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    ).images


@pytest.fixture(scope="module")
def pipeline_output(pipe):
    """The pipeline's own result for one prompt: VAE latents (output_type="latent") and decoded images ("pt")."""
    return _pipeline(pipe, "photo of kleinchar", "latent"), _pipeline(pipe, "photo of kleinchar", "pt")


# --- (a) equality with Flux2KleinPipeline ---------------------------------------------------------------------------
@pytest.mark.parametrize("batched_cfg", [False, True], ids=["two-pass-cfg", "batched-cfg"])
def test_preview_equals_diffusers_klein_pipeline_for_same_seed_steps_cfg_and_size(
    pipe, embeds, pipeline_output, batched_cfg
):
    prompts, negative = embeds
    expected_latents, expected_images = pipeline_output

    normalised = denoise_base(
        pipe.transformer, prompts[:1], negative, WIDTH, HEIGHT, SAMPLE_STEPS, CFG, SEED, batched_cfg=batched_cfg
    )
    latents_diff = (vae_latents(pipe.vae, normalised) - expected_latents).abs().max().item()
    images = sample_base(
        pipe.transformer,
        pipe.vae,
        prompts[:1],
        negative,
        WIDTH,
        HEIGHT,
        SAMPLE_STEPS,
        CFG,
        SEED,
        batched_cfg=batched_cfg,
    )
    image_diff = (images - expected_images).abs().max().item()

    print(
        f"max |ours - pipeline| ({'batched' if batched_cfg else 'two-pass'} CFG): "
        f"latents {latents_diff:.3g}, images {image_diff:.3g}"
    )
    assert images.shape == (1, 3, HEIGHT, WIDTH)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert latents_diff <= PIPELINE_TOLERANCE
    assert image_diff <= PIPELINE_TOLERANCE
    assert expected_latents.abs().mean() > 0.1  # a real comparison, not of two zero tensors


def test_two_pass_cfg_is_bit_identical_to_the_pipeline_for_a_batch_of_prompts(pipe, embeds):
    """The pipeline draws one noise tensor for the whole batch; so do we, in the same shape and order."""
    prompts, negative = embeds
    expected = _pipeline(pipe, ["photo of kleinchar", "a red hat in the city"], "latent")
    ours = vae_latents(
        pipe.vae,
        denoise_base(pipe.transformer, prompts, negative, WIDTH, HEIGHT, SAMPLE_STEPS, CFG, SEED, batched_cfg=False),
    )
    assert torch.equal(ours, expected)


def test_cfg_one_runs_a_single_prediction_like_the_pipeline(pipe, embeds):
    prompts, _ = embeds
    expected = _pipeline(pipe, "photo of kleinchar", "latent", cfg=1.0)
    ours = vae_latents(
        pipe.vae, denoise_base(pipe.transformer, prompts[:1], None, WIDTH, HEIGHT, SAMPLE_STEPS, 1.0, SEED)
    )
    assert torch.equal(ours, expected)


def test_a_different_seed_gives_a_different_preview(pipe, embeds):
    prompts, negative = embeds
    first = denoise_base(pipe.transformer, prompts[:1], negative, WIDTH, HEIGHT, 2, CFG, seed=0)
    second = denoise_base(pipe.transformer, prompts[:1], negative, WIDTH, HEIGHT, 2, CFG, seed=1)
    again = denoise_base(pipe.transformer, prompts[:1], negative, WIDTH, HEIGHT, 2, CFG, seed=0)
    assert torch.equal(first, again)
    assert not torch.allclose(first, second)


def test_cached_per_prompt_embeddings_without_batch_dimension_are_accepted(pipe, embeds):
    """The trainer caches (512, 3H) per prompt; sampling takes them as they are."""
    prompts, negative = embeds
    batched = denoise_base(pipe.transformer, prompts[:1], negative, WIDTH, HEIGHT, 2, CFG, SEED)
    cached = denoise_base(pipe.transformer, prompts[0], negative[0], WIDTH, HEIGHT, 2, CFG, SEED)
    assert torch.equal(batched, cached)


# --- (c) batched CFG equals two-pass CFG ---------------------------------------------------------------------------
def test_batched_cfg_equals_two_pass_cfg(pipe, embeds):
    prompts, negative = embeds
    two_pass = denoise_base(
        pipe.transformer, prompts, negative, WIDTH, HEIGHT, SAMPLE_STEPS, CFG, SEED, batched_cfg=False
    )
    batched = denoise_base(
        pipe.transformer, prompts, negative, WIDTH, HEIGHT, SAMPLE_STEPS, CFG, SEED, batched_cfg=True
    )
    assert (batched - two_pass).abs().max().item() <= PIPELINE_TOLERANCE


def test_cfg_mixes_the_empty_prompt_prediction_in(pipe, embeds):
    """With CFG 4 the result differs from CFG 1: the uncond branch really takes part."""
    prompts, negative = embeds
    guided = denoise_base(pipe.transformer, prompts[:1], negative, WIDTH, HEIGHT, 2, 4.0, SEED)
    unguided = denoise_base(pipe.transformer, prompts[:1], negative, WIDTH, HEIGHT, 2, 1.0, SEED)
    assert not torch.allclose(guided, unguided)


# --- progress and interrupt --------------------------------------------------------------------------------------
def test_progress_reports_every_sample_step(pipe, embeds):
    prompts, negative = embeds
    seen = []
    denoise_base(
        pipe.transformer,
        prompts[:1],
        negative,
        WIDTH,
        HEIGHT,
        3,
        CFG,
        SEED,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_interrupt_stops_sampling_between_sample_steps(pipe, embeds):
    prompts, negative = embeds
    calls = []

    def interrupt() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(SamplingInterrupted, match="sample step 2/5"):
        denoise_base(pipe.transformer, prompts[:1], negative, WIDTH, HEIGHT, 5, CFG, SEED, interrupt=interrupt)


def test_image_sides_must_be_multiples_of_16(pipe, embeds):
    prompts, negative = embeds
    with pytest.raises(PreviewError, match="width 60"):
        denoise_base(pipe.transformer, prompts[:1], negative, 60, 48, 2, CFG, SEED)


# --- (b) the sigma grid ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokens", "expected"),
    [(1024, (2.031, 1.916, 1.702)), (4096, (2.291, 2.198, 2.023))],
)
def test_empirical_mu_matches_the_published_examples(tokens, expected):
    for sample_steps, mu in zip((4, 20, 50), expected):
        assert compute_empirical_mu(tokens, sample_steps) == pytest.approx(mu, abs=5e-4)


def test_empirical_mu_jumps_to_the_200_step_fit_above_4300_tokens():
    assert compute_empirical_mu(4624, 50) == pytest.approx(1.239, abs=5e-4)
    assert compute_empirical_mu(4624, 4) == compute_empirical_mu(4624, 200)  # no step dependence above 4300
    assert compute_empirical_mu(4300, 4) != compute_empirical_mu(4300, 200)


def test_sigma_grid_for_1024_square_at_50_sample_steps():
    sigmas = base_sigmas(50, image_token_count(1024, 1024))
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    assert sigmas[0].item() == 1.0
    assert sigmas[1].item() == pytest.approx(0.9973, abs=1e-4)
    assert sigmas[-2].item() == pytest.approx(0.1337, abs=1e-4)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def _comfyui_flux2_schedule(sample_steps: int, width: int, height: int) -> np.ndarray:
    """ComfyUI's Flux2Scheduler as read in comfy_extras/nodes_flux.py, re-derived here in float64:
    L = round(W*H/256); sigmas = shift(linspace(1, 0, N+1)) with e^mu / (e^mu + (1/t - 1)) and the same mu fit."""
    tokens = round(width * height / 256)
    if tokens > 4300:
        mu = 0.00016927 * tokens + 0.45666666
    else:
        at_10 = 8.73809524e-05 * tokens + 1.89833333
        at_200 = 0.00016927 * tokens + 0.45666666
        mu = at_10 + (at_200 - at_10) * (sample_steps - 10) / 190
    t = np.linspace(1.0, 0.0, sample_steps + 1)
    with np.errstate(divide="ignore"):
        return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))  # 1/0 = inf gives the final 0


@pytest.mark.parametrize("sample_steps", [1, 4, 20, 30, 50])
@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (768, 1344), (512, 512), (1088, 1088), (64, 48)])
def test_sigma_grid_equals_comfyui_flux2_scheduler(sample_steps, width, height):
    ours = base_sigmas(sample_steps, image_token_count(width, height)).double().numpy()
    np.testing.assert_allclose(ours, _comfyui_flux2_schedule(sample_steps, width, height), rtol=0, atol=1e-6)


def test_sigma_grid_is_bit_identical_to_the_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as diffusers_mu

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    for tokens in (12, 1024, 2304, 4096, 4624):
        for sample_steps in (1, 4, 20, 50):
            scheduler.set_timesteps(
                sigmas=np.linspace(1.0, 1 / sample_steps, sample_steps), mu=diffusers_mu(tokens, sample_steps)
            )
            assert torch.equal(base_sigmas(sample_steps, tokens), scheduler.sigmas), (tokens, sample_steps)


def _import_comfyui_flux_nodes():
    """ComfyUI's own module when this interpreter can import ComfyUI; None (with the reason) otherwise.

    sys.path is left alone: putting a ComfyUI tree on it would change what every other test in the session imports.
    """
    try:
        import comfy  # noqa: F401
    except ImportError:
        return None, (
            "ComfyUI is not importable in this interpreter (run pytest with a ComfyUI tree and its requirements on "
            "PYTHONPATH to compare against its Flux2Scheduler directly; the formula test above covers it otherwise)"
        )
    try:
        from comfy_extras import nodes_flux
    except Exception as exc:  # a ComfyUI tree whose own imports fail here
        return None, f"ComfyUI's comfy_extras.nodes_flux does not import here: {exc!r}"
    if not hasattr(nodes_flux, "Flux2Scheduler"):
        return None, "this ComfyUI has no Flux2Scheduler (it predates FLUX.2)"
    return nodes_flux, ""


def test_sigma_grid_equals_comfyui_flux2_scheduler_itself():
    nodes_flux, reason = _import_comfyui_flux_nodes()
    if nodes_flux is None:
        pytest.skip(reason)
    for width, height in ((1024, 1024), (768, 1344), (64, 48)):
        for sample_steps in (4, 20, 50):
            theirs = nodes_flux.Flux2Scheduler.execute(sample_steps, width, height).result[0]
            ours = base_sigmas(sample_steps, image_token_count(width, height))
            torch.testing.assert_close(ours, theirs.to(torch.float32), rtol=0, atol=1e-6)


def test_zero_sample_steps_is_refused():
    with pytest.raises(PreviewError, match="sample_steps"):
        base_sigmas(0, 1024)


# --- (d) warnings ------------------------------------------------------------------------------------------------
def test_no_warning_at_the_base_defaults():
    assert sample_warnings(PRESET.sample_steps, PRESET.cfg) == []
    assert sample_warnings(PRESET.min_base_sample_steps, 1.6) == []


def test_few_sample_steps_warn_that_base_needs_about_50_and_a_lora_looks_weak():
    (warning,) = sample_warnings(PRESET.min_base_sample_steps - 1, PRESET.cfg)
    assert "sample_steps 29" in warning
    assert "50 sample steps" in warning and "CFG about 4" in warning and "weak" in warning


def test_cfg_at_or_below_1_5_warns_about_missing_guidance():
    (warning,) = sample_warnings(PRESET.sample_steps, PRESET.min_base_cfg)
    assert "cfg 1.5" in warning and "CFG about 4" in warning
    assert len(sample_warnings(20, 1.0)) == 2


def test_distilled_models_get_no_base_warning():
    assert sample_warnings(4, 1.0, is_distilled=True) == []
