"""The LoRA trainer on the tiny Klein: the same code path as 9B, in seconds on a CPU."""

import functools
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import quick_cli_train_args, quick_config, quick_spec

from klein_core.errors import NonFiniteLoss, ResumeError, TrainingInterrupted
from klein_core.model import lora as lora_io
from klein_core.model.latents import predict_velocity
from klein_core.model.loading import load_transformer, resolve_model
from klein_core.model.lora import LoraPatcher
from klein_core.train.config import TrainCallbacks
from klein_core.train.loop import train
from klein_core.train.session import checkpoint_name
from klein_core.train.objective import MicroBatch, accumulate_gradients

quiet = TrainCallbacks(log=lambda _m: None)


def run(tiny_diffusers, folder, out, cache, config=None, spec=None, **kw):
    return train(
        resolve_model(tiny_diffusers),
        spec or quick_spec(folder),
        config or quick_config(),
        out,
        callbacks=kw.pop("callbacks", quiet),
        cache_dir=cache,
        **kw,
    )


@pytest.fixture
def train_sample(tiny_diffusers, sample_dataset, tmp_path, training_cache):
    """Train the tiny Klein on the sample dataset into the test's folder: ``train_sample(config=...)``."""
    return functools.partial(run, tiny_diffusers, sample_dataset, tmp_path, training_cache)


def tiny_forward_inputs(timestep: float) -> dict:
    """Seeded inputs for one forward of the tiny transformer (16 image tokens, 8 text tokens)."""
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 128, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 48, generator=g),
        timestep=torch.tensor([timestep]),
        img_ids=torch.zeros(1, 16, 4),
        txt_ids=torch.zeros(1, 8, 4),
        guidance=None,
    )


def state_equal(a: dict, b: dict, atol=0.0) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[k][0], b[k][0], atol=atol, rtol=0) and torch.allclose(a[k][1], b[k][1], atol=atol, rtol=0)
        for k in a
    )


# --- targets -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant,doubles,singles,expected", [("9B", 8, 24, 112), ("4B", 5, 20, 80), ("tiny", 2, 2, 20)]
)
def test_lora_targets_every_attention_projection_of_every_block(variant, doubles, singles, expected):
    from diffusers import Flux2Transformer2DModel

    from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG

    config = dict(TINY_TRANSFORMER_CONFIG, num_layers=doubles, num_single_layers=singles)
    if variant != "tiny":
        heads = {"9B": 32, "4B": 24}[variant]
        config.update(num_attention_heads=heads, joint_attention_dim={"9B": 12288, "4B": 7680}[variant])
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    names = lora_io.target_module_names(model)
    assert len(names) == expected == lora_io.expected_target_count(doubles, singles)
    # the single-block output projection is the one other trainers forgot
    assert sum(n.endswith("attn.to_out") and n.startswith("single_") for n in names) == singles
    assert sum(n.endswith("attn.to_add_out") for n in names) == doubles
    with torch.device("meta"):
        lora_io.add_lora(model, rank=16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if variant == "9B":
        assert trainable == 112 * 16 * 0 + sum(
            16 * (m.in_features + m.out_features) for n, m in model.named_modules() if n in set(names)
        )


def test_a_fresh_adapter_is_a_no_op_and_removing_a_trained_one_restores_the_base_model(tiny_diffusers):
    import warnings

    transformer = load_transformer(resolve_model(tiny_diffusers))
    kw = tiny_forward_inputs(timestep=0.7)
    with torch.no_grad():
        base = transformer(**kw).sample
        lora_io.add_lora(transformer, rank=8)
        assert torch.equal(transformer(**kw).sample, base)  # B starts at 0
        for p in lora_io.lora_parameters(transformer):
            p.add_(0.1)
        assert not torch.allclose(transformer(**kw).sample, base)
        lora_io.remove_lora(transformer)
        assert torch.equal(transformer(**kw).sample, base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns when it finds a stale adapter record
        lora_io.add_lora(transformer, rank=4)
    assert {p.shape[0] for n, p in transformer.named_parameters() if "lora_A" in n} == {4}


# --- optimisation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("save_every", -3, "save_every must be a whole number >= 0, got -3"),
        ("log_every", 0, "log_every must be a whole number >= 1, got 0"),
        ("rank", 0, "rank must be a whole number >= 1, got 0"),
        ("learning_rate", 0.0, "learning_rate must be a finite number > 0, got 0.0"),
        ("regularization_weight", -0.1, "regularization_weight must be a finite number >= 0, got -0.1"),
        ("empty_prompt_preservation", -1.0, "empty_prompt_preservation must be a finite number >= 0, got -1.0"),
    ],
)
def test_an_impossible_training_setting_is_refused_by_name(setting, value, message):
    from klein_core.errors import ConfigError
    from klein_core.train.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{setting: value})


def test_the_cli_refuses_a_bad_setting_before_loading_any_model(sample_dataset, tmp_path, capsys):
    from klein_core.cli import main

    code = main(
        [
            "train",
            "--model",
            str(tmp_path / "no-model"),
            "--images",
            str(sample_dataset),
            "--trigger",
            "kleinchar",
            "--out",
            str(tmp_path / "run"),
            "--save-every",
            "-3",
        ]
    )
    assert code != 0 and "save_every must be a whole number >= 0, got -3" in capsys.readouterr().err


def test_grad_accum_4_of_batch_1_equals_one_batch_of_4(tiny_diffusers):
    g = torch.Generator().manual_seed(1)
    latents, embeds = torch.randn(4, 128, 2, 2, generator=g), torch.randn(4, 512, 48, generator=g)
    noise, sigma = torch.randn(4, 128, 2, 2, generator=g), torch.rand(4, generator=g)

    def update(micro_batches):
        transformer = load_transformer(resolve_model(tiny_diffusers))
        transformer.requires_grad_(False)
        torch.manual_seed(0)
        lora_io.add_lora(transformer, rank=4)
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        params = lora_io.lora_parameters(transformer)
        start = [p.detach().clone() for p in params]
        accumulate_gradients(transformer, micro_batches)
        return [p.grad.clone() for p in params], start

    one_batch, s1 = update([MicroBatch(latents, embeds, noise, sigma)])
    accumulated, s2 = update(
        [MicroBatch(latents[i : i + 1], embeds[i : i + 1], noise[i : i + 1], sigma[i : i + 1]) for i in range(4)]
    )
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    for a, b in zip(one_batch, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_same_seed_gives_the_identical_lora(tiny_diffusers, sample_dataset, tmp_path, training_cache):
    a = run(tiny_diffusers, sample_dataset, tmp_path / "a", training_cache)
    b = run(tiny_diffusers, sample_dataset, tmp_path / "b", training_cache)
    c = run(tiny_diffusers, sample_dataset, tmp_path / "c", training_cache, config=quick_config(seed=1))
    wa, wb, wc = (lora_io.read_lora_file(r.final_lora) for r in (a, b, c))
    assert state_equal(wa, wb)
    assert not state_equal(wc, wa)


def test_loss_falls_on_the_sample_dataset(train_sample):
    result = train_sample(config=quick_config(training_steps=30, save_every=15, learning_rate=1e-2))
    checkpoints = result.manifest["history"]["checkpoints"]
    # the fixed-noise validation loss is comparable across steps (step 0 = before training), unlike the training loss
    assert checkpoints[0]["step"] == 0
    first, last = checkpoints[0]["validation_loss"], checkpoints[-1]["validation_loss"]
    assert last < first * 0.95, (first, last)
    losses = result.manifest["history"]["losses"]
    assert sum(losses[-10:]) < sum(losses[:10])


def _moved_prediction(result, prompt: str) -> float:
    """How far the run's final LoRA moves the tiny transformer's prediction for ``prompt`` (seeded noisy inputs)."""
    g = torch.Generator().manual_seed(0)
    tokens, sigma, embeds = torch.randn(2, 16, 128, generator=g), torch.tensor([0.9, 0.5]), result.preview_embeds
    prompt_embeds = embeds[prompt][None].expand(2, -1, -1)

    def velocity(weights):
        with torch.no_grad(), LoraPatcher(result.transformer).applied(weights):
            return predict_velocity(result.transformer, tokens, sigma, prompt_embeds, 4, 4)

    return float((velocity(result.checkpoints[-1].weights) - velocity(None)).norm())


def test_empty_prompt_preservation_holds_the_lora_s_empty_prompt_prediction_near_the_base_s(train_sample):
    """Real CFG is v("") + g·(v(prompt) - v("")): whatever a LoRA does to v("") guidance takes away again. The term
    holds v("") near the base's (measured: moved 2.9 against 9.4 without it). On this random tiny model every prompt
    moves alike; tests/test_shipped_tiny_lora.py shows the effect on guided previews of the drawn one."""
    config = quick_config(training_steps=12, learning_rate=1e-2, save_every=0)
    plain = train_sample(config=config)
    kept = train_sample(config=replace(config, empty_prompt_preservation=1.0))
    assert _moved_prediction(kept, "") < 0.5 * _moved_prediction(plain, "")


# --- run folder ------------------------------------------------------------------------------------------------------
def test_run_folder_has_step_checkpoints_final_lora_state_and_manifest(tmp_path, train_sample):
    result = train_sample(config=quick_config(training_steps=4, save_every=2, output_name="hero"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "hero.safetensors",
        "hero_best.safetensors",
        "hero_step000002.safetensors",
        "hero_step000004.safetensors",
        "report.png",
        "run.json",
        "training_state.pt",
    ]
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["plan"]["training_steps"] == 4
    assert manifest["plan"]["repeats_per_image"] == pytest.approx(4 / 6)
    assert [Path(c).name for c in manifest["checkpoints"]] == [
        "hero_step000002.safetensors",
        "hero_step000004.safetensors",
    ]
    records = manifest["history"]["checkpoints"]
    assert [c["step"] for c in records] == [0, 2, 4]  # step 0: the untrained baseline
    assert all(c["validation_loss"] is not None for c in records)
    assert manifest["history"]["loss_steps"] == [1, 2, 3, 4]
    assert manifest["final_lora"].endswith("hero.safetensors")
    assert [c.training_step for c in result.checkpoints] == [2, 4]


def test_loss_is_read_only_every_log_every_training_steps_yet_every_loss_is_kept(train_sample):
    # reading the loss waits for the GPU: the loop does it at log intervals (and checkpoints), never per step
    reads, progress = [], []
    result = train_sample(
        config=quick_config(training_steps=5, save_every=0, log_every=2),
        callbacks=TrainCallbacks(
            on_step=reads.append, on_progress=lambda step, total: progress.append(step), log=lambda m: None
        ),
    )
    assert [r["training_step"] for r in reads] == [2, 4, 5]
    assert [[step for step, _ in r["losses"]] for r in reads] == [[1, 2], [3, 4], [5]]  # every loss still arrives
    assert progress == [1, 2, 3, 4, 5]  # progress needs no loss, so it moves every training step
    assert result.manifest["history"]["loss_steps"] == [1, 2, 3, 4, 5]


def test_keep_last_n_prunes_old_checkpoints(tmp_path, train_sample):
    train_sample(config=quick_config(training_steps=6, save_every=2, keep_last=1))
    assert sorted(p.name for p in tmp_path.glob("*_step*")) == [checkpoint_name("klein_lora", 6)]


def test_lora_file_has_folded_alpha_no_alpha_keys_and_metadata(train_sample):
    from safetensors import safe_open

    result = train_sample(config=quick_config(rank=4, alpha=8))
    with safe_open(str(result.final_lora), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert not any("alpha" in k for k in keys)
    assert len(keys) == 2 * 20
    assert meta["trigger_word"] == "kleinchar" and meta["rank"] == "4" and meta["training_steps"] == "4"
    assert "repeats_per_image" in meta and "Base" in meta["base_model"]


def test_saved_lora_loads_in_diffusers_with_the_same_effect_as_the_in_memory_adapter(tiny_diffusers, train_sample):
    from diffusers import Flux2KleinPipeline

    result = train_sample(config=quick_config(rank=4, alpha=8, learning_rate=1e-2))
    weights = lora_io.read_lora_file(result.final_lora)
    pipe = Flux2KleinPipeline.from_pretrained(tiny_diffusers)
    pipe.load_lora_weights(str(result.final_lora))
    kw = tiny_forward_inputs(timestep=0.5)
    with torch.no_grad():
        with lora_io.LoraPatcher(result.transformer).applied(weights):
            ours = result.transformer(**kw).sample
        base = result.transformer(**kw).sample
        theirs = pipe.transformer(**kw).sample
    assert not torch.allclose(ours, base, atol=1e-4)  # the LoRA does something
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_crash_between_write_and_rename_leaves_no_partial_lora(tmp_path, monkeypatch, train_sample):
    import klein_core.atomic as atomic

    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("_step000004.safetensors"):
            raise OSError("disk unplugged")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError):
        train_sample(config=quick_config(training_steps=4, save_every=2))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "klein_lora_step000002.safetensors" in files
    assert not any(f.endswith(".partial") or "step000004" in f for f in files), files
    assert lora_io.read_lora_file(tmp_path / "klein_lora_step000002.safetensors")


# --- resume, interrupt, NaN -------------------------------------------------------------------------------------------
def test_resume_after_interrupt_equals_an_uninterrupted_run(tiny_diffusers, sample_dataset, tmp_path, training_cache):
    config = quick_config(training_steps=6, save_every=3, warmup_steps=2)
    straight = run(tiny_diffusers, sample_dataset, tmp_path / "straight", training_cache, config=config)

    calls = {"n": 0}

    def stop_after_four_steps():
        calls["n"] += 1
        return calls["n"] > 4  # one micro-batch per step: stop at the 5th

    messages = []
    with pytest.raises(TrainingInterrupted, match="training step 4/6"):
        run(
            tiny_diffusers,
            sample_dataset,
            tmp_path / "broken",
            training_cache,
            config=config,
            callbacks=TrainCallbacks(should_stop=stop_after_four_steps, log=messages.append),
        )
    assert (tmp_path / "broken" / checkpoint_name("klein_lora", 4)).exists()
    assert any(str(tmp_path / "broken") in m for m in messages)
    resumed = run(tiny_diffusers, sample_dataset, tmp_path / "broken", training_cache, config=config, resume=True)
    assert state_equal(
        lora_io.read_lora_file(straight.final_lora), lora_io.read_lora_file(resumed.final_lora), atol=1e-6
    )


def test_resume_refuses_a_changed_dataset_naming_what_changed(tiny_diffusers, sample_dataset, tmp_path, training_cache):
    import shutil

    run(tiny_diffusers, sample_dataset, tmp_path / "run", training_cache)
    changed = tmp_path / "data"
    shutil.copytree(sample_dataset, changed)
    (changed / "sample_00.txt").write_text("photo of [trigger] in a hat")
    with pytest.raises(ResumeError, match="captions"):
        run(tiny_diffusers, changed, tmp_path / "run", training_cache, resume=True)
    with pytest.raises(ResumeError, match="learning_rate"):
        run(
            tiny_diffusers,
            sample_dataset,
            tmp_path / "run",
            training_cache,
            config=quick_config(learning_rate=5e-5),
            resume=True,
        )
    run(tiny_diffusers, changed, tmp_path / "run", training_cache, resume=True, allow_changes=True)


def test_resume_with_a_lowered_learning_rate_trains_at_the_new_rate(
    tiny_diffusers, sample_dataset, tmp_path, training_cache
):
    import shutil

    first = quick_config(training_steps=2, save_every=0, learning_rate=1e-2)
    run(tiny_diffusers, sample_dataset, tmp_path / "a", training_cache, config=first)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same = run(
        tiny_diffusers,
        sample_dataset,
        tmp_path / "a",
        training_cache,
        config=replace(first, training_steps=4),
        resume=True,
        allow_changes=True,
    )
    lowered = run(
        tiny_diffusers,
        sample_dataset,
        tmp_path / "b",
        training_cache,
        config=replace(first, training_steps=4, learning_rate=1e-4),
        resume=True,
        allow_changes=True,
    )
    assert not state_equal(
        lora_io.read_lora_file(same.final_lora), lora_io.read_lora_file(lowered.final_lora), atol=1e-6
    )
    assert lowered.manifest["config"]["learning_rate"] == 1e-4


def test_non_finite_loss_stops_keeps_last_good_checkpoint_and_advises_lower_lr(tmp_path, train_sample):
    with pytest.raises(NonFiniteLoss, match=r"Lower the learning rate \(LR 1e6 → 5e5\)") as info:
        train_sample(config=quick_config(training_steps=40, save_every=1, learning_rate=1e6))
    assert "last good checkpoint" in str(info.value)
    assert str(info.value.health.collapse.last_good_path) in str(info.value)  # the message and the verdict agree
    assert not (tmp_path / "klein_lora.safetensors").exists()
    for checkpoint in tmp_path.glob("*_step*.safetensors"):
        weights = lora_io.read_lora_file(checkpoint)
        assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in weights.values())


def test_a_non_finite_loss_between_loss_reads_is_named_at_its_first_training_step(tmp_path, train_sample):
    with pytest.raises(NonFiniteLoss) as info:
        train_sample(config=quick_config(training_steps=40, save_every=0, log_every=10, learning_rate=1e6))
    history = json.loads((tmp_path / "run.json").read_text())["history"]
    first_bad = next(step for step, v in zip(history["loss_steps"], history["losses"]) if not isinstance(v, float))
    assert first_bad < 10 and f"at training step {first_bad}," in str(info.value)


def test_a_stop_after_an_unread_non_finite_loss_saves_nothing(tmp_path, train_sample):
    calls = {"n": 0}

    def stop_at_step_six():
        calls["n"] += 1
        return calls["n"] > 5

    messages = []
    with pytest.raises(TrainingInterrupted, match="non-finite at training step [1-5], so nothing was saved"):
        train_sample(
            config=quick_config(training_steps=40, save_every=0, log_every=10, learning_rate=1e6),
            callbacks=TrainCallbacks(should_stop=stop_at_step_six, log=messages.append),
        )
    assert not list(tmp_path.glob("*_step*.safetensors")) and not (tmp_path / "training_state.pt").exists()


# --- memory and data hygiene ------------------------------------------------------------------------------------------
def test_second_run_on_an_unchanged_dataset_never_loads_the_text_encoder(
    tiny_diffusers, sample_dataset, tmp_path, monkeypatch
):
    import klein_core.train.session as training

    loads = {"n": 0}
    real = training.load_text_encoder

    def counting(*a, **k):
        loads["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(training, "load_text_encoder", counting)
    cache = tmp_path / "cache"
    run(tiny_diffusers, sample_dataset, tmp_path / "one", cache)
    assert loads["n"] == 1
    run(tiny_diffusers, sample_dataset, tmp_path / "two", cache)
    assert loads["n"] == 1


def test_text_encoder_is_released_before_training(tiny_diffusers, sample_dataset, tmp_path):
    import gc
    import weakref

    import klein_core.train.session as training

    refs = []
    real = training.load_text_encoder

    def tracking(*a, **k):
        te, tok = real(*a, **k)
        refs.append(weakref.ref(te))
        return te, tok

    seen_during_training = []

    def on_step(_info):
        gc.collect()
        seen_during_training.append(refs[0]() is not None)

    training.load_text_encoder, saved = tracking, training.load_text_encoder
    try:
        run(
            tiny_diffusers,
            sample_dataset,
            tmp_path / "run",
            tmp_path / "cache",
            callbacks=TrainCallbacks(on_step=on_step, log=lambda m: None),
        )
    finally:
        training.load_text_encoder = saved
    assert refs and seen_during_training and not any(seen_during_training)


def _folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
    } | {"__listing__": ",".join(sorted(str(p.relative_to(folder)) for p in folder.rglob("*")))}


def test_full_training_run_never_writes_in_the_dataset_folder(tiny_diffusers, sample_dataset, tmp_path):
    before = _folder_digest(sample_dataset)
    run(
        tiny_diffusers,
        sample_dataset,
        tmp_path / "run",
        tmp_path / "cache",
        config=quick_config(training_steps=3, save_every=1),
    )
    assert _folder_digest(sample_dataset) == before


def test_comfyui_files_train_the_same_as_the_diffusers_folder(
    tiny_diffusers, tiny_comfy_files, sample_dataset, tmp_path, training_cache
):
    a = run(tiny_diffusers, sample_dataset, tmp_path / "a", training_cache)
    files = resolve_model(tiny_comfy_files["transformer"], tiny_comfy_files["text_encoder"], tiny_comfy_files["vae"])
    b = train(
        files, quick_spec(sample_dataset), quick_config(), tmp_path / "b", callbacks=quiet, cache_dir=training_cache
    )
    assert state_equal(lora_io.read_lora_file(a.final_lora), lora_io.read_lora_file(b.final_lora), atol=1e-5)


def test_cli_train_json_summary(tiny_diffusers, sample_dataset, tmp_path, capsys):
    from klein_core.cli import main

    code = main(
        quick_cli_train_args(
            tiny_diffusers,
            sample_dataset,
            tmp_path / "cache",
            *("--out", str(tmp_path / "run"), "--training-steps", "2", "--save-every", "1"),
        )
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["training_steps"] == 2
    assert summary["repeats_per_image"] == pytest.approx(2 / 6)
    assert Path(summary["final_lora"]).exists() and Path(summary["run_dir"]) == tmp_path / "run"
    assert [Path(p).name for p in summary["checkpoints"]] == [
        "klein_lora_step000001.safetensors",
        "klein_lora_step000002.safetensors",
    ]


def test_cli_train_reports_a_bad_dataset_before_loading_any_model(tmp_path, capsys):
    from klein_core.cli import main

    (tmp_path / "empty").mkdir()
    code = main(
        [
            "train",
            "--model",
            str(tmp_path / "no-such-model"),
            "--images",
            str(tmp_path / "empty"),
            "--trigger",
            "x",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "empty" in capsys.readouterr().err
