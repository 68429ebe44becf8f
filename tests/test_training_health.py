"""Training health on the tiny Klein: a normal run is healthy, an unstable one is flagged with the guide's ordered
advice, the best checkpoint is kept and explained, and the regularization set mixes in at its weight."""

import functools
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import quick_cli_train_args, quick_config, quick_spec

from klein_core.errors import NonFiniteLoss
from klein_core.model import lora as lora_io
from klein_core.model.loading import resolve_model
from klein_core.train.config import TrainCallbacks
from klein_core.train.loop import train

quiet = TrainCallbacks(log=lambda _m: None)
UNSTABLE_LR = 100.0  # the tiny model shrugs off LR 10 (Adam + QK norms) and diverges to NaN within ~10 steps at 100


def run(tiny_diffusers, folder, out, cache, config, **kw):
    return train(resolve_model(tiny_diffusers), quick_spec(folder), config, out, callbacks=quiet, cache_dir=cache, **kw)


@pytest.fixture(scope="module")
def normal_runs(tiny_diffusers, sample_dataset, training_cache, tmp_path_factory):
    """Three seeds of an ordinary run (LR 3e-3, the tiny model's equivalent of the preset's 1e-4), with health
    previews so every signal (validation, training loss, preview statistics, likeness) gets its chance to misfire."""
    out = tmp_path_factory.mktemp("normal")
    return [
        run(
            tiny_diffusers,
            sample_dataset,
            out / f"seed{seed}",
            training_cache,
            quick_config(training_steps=12, save_every=3, learning_rate=3e-3, seed=seed, health_sample_steps=8),
            preview_prompts=("photo of [trigger]",),
        )
        for seed in (0, 1, 2)
    ]


@pytest.fixture
def train_sample(tiny_diffusers, sample_dataset, tmp_path, training_cache):
    """Train the tiny Klein on the sample dataset into the test's folder: ``train_sample(config=...)``."""
    return functools.partial(run, tiny_diffusers, sample_dataset, tmp_path, training_cache)


def test_a_normal_run_raises_no_collapse_alarm_over_several_seeds(normal_runs):
    for result in normal_runs:
        assert result.health.collapse is None, result.health.verdict
        assert result.health.verdict.startswith("Healthy")


def test_best_checkpoint_is_written_atomically_and_the_reason_is_recorded(normal_runs):
    result = normal_runs[0]
    health = json.loads((result.run_dir / "run.json").read_text())["health"]
    best = health["best_checkpoint"]
    assert best["metric"] == "likeness" and "highest likeness" in best["reason"]
    assert Path(best["file"]).name == "klein_lora_best.safetensors"
    assert Path(best["file"]).read_bytes() == Path(best["path"]).read_bytes()
    assert health["collapse"] is None
    assert (result.run_dir / "report.png").exists()


def test_an_unstable_run_is_flagged_by_its_validation_loss_and_nan_with_the_guides_four_fixes_in_order(
    tmp_path, train_sample
):
    with pytest.raises(NonFiniteLoss) as info:
        train_sample(quick_config(training_steps=40, save_every=2, learning_rate=UNSTABLE_LR))
    health = info.value.health
    assert health.collapse is not None
    # the non-finite loss itself, and the validation loss rising before it
    assert {"training_loss_non_finite", "validation_loss_rising"} <= set(health.collapse.signal_names)
    advice = health.advice
    assert [line[:2] for line in advice] == ["1.", "2.", "3.", "4."]
    assert "LR 1e2 → 5e1" in advice[0]
    assert "regularization" in advice[2]
    assert str(health.collapse.last_good_path) in advice[3]
    assert health.best is not None and health.best.step < health.collapse.began_step
    assert lora_io.read_lora_file(health.best_lora)  # the last good checkpoint, finite and loadable
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["health"]["collapse"]["step"] == health.collapse.began_step
    assert (tmp_path / "report.png").exists()
    assert not (tmp_path / "klein_lora.safetensors").exists()


def test_a_run_that_gets_better_then_turns_to_chaos_is_caught_by_its_previews_and_likeness(train_sample):
    # better: 15 training steps at a sound LR, checkpoints every 5 with health previews; then chaos: the run goes on
    # at LR 100, which turns the next preview into one flat colour long before the loss goes non-finite
    good = quick_config(training_steps=15, save_every=5, learning_rate=3e-3, rank=16, health_sample_steps=8)
    prompts = ("photo of [trigger]",)
    train_sample(good, preview_prompts=prompts)
    try:
        result = train_sample(
            replace(good, training_steps=40, learning_rate=UNSTABLE_LR, stop_on_collapse=True),
            preview_prompts=prompts,
            resume=True,
            allow_changes=True,
        )
        health = result.health
    except NonFiniteLoss as exc:
        health = exc.health
    assert {"preview_blowout", "likeness_drop"} <= set(health.collapse.signal_names), health.verdict
    assert health.collapse.began_step == 20 and health.collapse.last_good_step == 15
    assert health.best.step <= 15 and health.best.metric == "likeness"
    assert "4. Stop early and keep the last good checkpoint: step 15" in health.verdict


def test_health_previews_give_likeness_and_preview_statistics_per_checkpoint(train_sample):
    result = train_sample(
        quick_config(training_steps=4, save_every=2, health_sample_steps=4),
        preview_prompts=("photo of [trigger]",),
    )
    records = result.manifest["history"]["checkpoints"]
    assert records[0]["step"] == 0 and records[0]["preview_stats"]  # the untrained base: the previews' baseline
    saved = [c for c in records if c["lora_path"]]
    assert saved and all(
        c["preview_stats"] and c["likeness"] is not None and 0.0 <= c["likeness"] <= 1.0 for c in saved
    )
    assert result.manifest["history"]["likeness_backend"]  # labelled: face, or generic image similarity
    assert result.health.best.metric == "likeness"


def test_regularization_set_mixes_in_at_its_weight_and_is_not_counted_in_the_dose(
    tiny_diffusers, sample_dataset, training_cache, tmp_path
):
    from klein_core.data.spec import DatasetSpec
    from klein_core.tools.sample_data import make_sample_dataset

    reg_folder = tmp_path / "class_images"
    make_sample_dataset(reg_folder, count=3, seed=7, size=96)
    for caption in reg_folder.glob("*.txt"):
        caption.unlink()  # class images: the default caption "photo of a person", never the trigger
    reg = DatasetSpec(
        folder=str(reg_folder), trigger="kleinchar", default_caption="photo of a person", resolutions=(64,)
    )
    plain = run(tiny_diffusers, sample_dataset, tmp_path / "plain", training_cache, quick_config())
    zero = run(
        tiny_diffusers,
        sample_dataset,
        tmp_path / "zero",
        training_cache,
        quick_config(regularization_weight=0.0),
        regularization=reg,
    )
    mixed = run(tiny_diffusers, sample_dataset, tmp_path / "mixed", training_cache, quick_config(), regularization=reg)
    weights = [lora_io.read_lora_file(r.final_lora) for r in (plain, zero, mixed)]

    def same(a, b):
        return all((a[k][0] - b[k][0]).abs().max() < 1e-6 and (a[k][1] - b[k][1]).abs().max() < 1e-6 for k in a)

    assert same(weights[0], weights[1])  # weight 0: exactly the identity-only update
    assert not same(weights[0], weights[2])
    assert mixed.plan.repeats_per_image == plain.plan.repeats_per_image  # identity images only
    info = mixed.manifest["regularization"]
    assert info["images"] == 3 and info["weight"] == pytest.approx(0.1)
    # the node's summary line travels on the run itself, apart from the identity dose
    assert mixed.regularization.startswith("regularization: 3 class images at weight 0.1")
    assert "not counted in the identity dose" in mixed.regularization and plain.regularization is None


def test_held_out_images_get_their_validation_loss_at_every_checkpoint_and_are_never_trained_on(
    tiny_diffusers, sample_dataset, training_cache, tmp_path
):
    import shutil

    from klein_core.data.spec import DatasetSpec
    from klein_core.tools.sample_data import make_sample_dataset

    held = tmp_path / "held_out"
    make_sample_dataset(held, count=2, seed=11, size=96)  # two more photos of "the person", never trained on
    shutil.copy(sample_dataset / "sample_00.png", held / "copy_of_a_training_image.png")  # a user's slip
    messages: list[str] = []
    result = train(
        resolve_model(tiny_diffusers),
        quick_spec(sample_dataset),
        quick_config(training_steps=4, save_every=2),
        tmp_path / "run",
        callbacks=TrainCallbacks(log=messages.append),
        cache_dir=training_cache,
        held_out=DatasetSpec(folder=str(held), trigger="kleinchar", resolutions=(64,)),
    )
    records = result.manifest["history"]["checkpoints"]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all(isinstance(r["held_out_loss"], float) and r["held_out_loss"] != r["validation_loss"] for r in records)
    assert result.manifest["held_out"]["images"] == 3
    assert result.plan.images == len(list(sample_dataset.glob("*.png"))) + len(list(sample_dataset.glob("*.jpg")))
    assert any("copy_of_a_training_image.png is the same file as training image sample_00.png" in m for m in messages)


def test_a_regularization_set_whose_captions_carry_the_trigger_is_refused_before_any_model_loads(
    tiny_diffusers, sample_dataset, tmp_path, monkeypatch
):
    import klein_core.train.session as training
    from klein_core.data.spec import DatasetSpec
    from klein_core.errors import DatasetError

    monkeypatch.setattr(training, "load_text_encoder", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(training, "load_transformer", lambda *a, **k: pytest.fail("a model was loaded"))
    identity_captions = DatasetSpec(folder=str(sample_dataset), trigger="kleinchar", resolutions=(64,))
    with pytest.raises(DatasetError, match=r"6 regularization captions contain the trigger 'kleinchar': sample_00.png"):
        run(
            tiny_diffusers,
            sample_dataset,
            tmp_path / "run",
            tmp_path / "cache",
            quick_config(),
            regularization=identity_captions,
        )
    # and the other way round: 'exclude' on the identity dataset itself would train captions without the word
    with pytest.raises(DatasetError, match="trigger_policy 'exclude' is for a regularization set"):
        train(
            resolve_model(tiny_diffusers),
            quick_spec(sample_dataset, trigger_policy="exclude"),
            quick_config(),
            tmp_path / "run",
            callbacks=quiet,
            cache_dir=tmp_path / "cache",
        )
    assert not (tmp_path / "run").exists()


def test_cli_train_json_reports_best_checkpoint_and_collapse(tiny_diffusers, sample_dataset, tmp_path, capsys):
    from klein_core.cli import main

    common = quick_cli_train_args(tiny_diffusers, sample_dataset, tmp_path / "cache")
    from klein_core.tools.sample_data import make_sample_dataset

    make_sample_dataset(tmp_path / "held", count=1, seed=5, size=96)
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "ok"),
                "--training-steps",
                "2",
                "--save-every",
                "1",
                "--held-out",
                str(tmp_path / "held"),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert Path(summary["best_checkpoint"]).name == "klein_lora_best.safetensors" and summary["collapse"] is None
    manifest = json.loads((tmp_path / "ok" / "run.json").read_text())
    assert manifest["held_out"]["images"] == 1 and manifest["health"]["best_checkpoint"]["metric"] == "held_out_loss"
    code = main([*common, "--out", str(tmp_path / "bad"), "--training-steps", "40", "--save-every", "2", "--lr", "100"])
    assert code == 1
    captured = capsys.readouterr()
    collapsed = json.loads(captured.out)
    assert collapsed["collapse"]["step"] >= 1 and len(collapsed["collapse"]["advice"]) == 4
    assert "Lower the learning rate" in captured.err
