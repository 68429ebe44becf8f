"""Kill-safety and resume: a `klein-lora train` killed with SIGKILL at any moment resumes to the unbroken result."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import state_equal

from klein_core.cli import main
from klein_core.crashpoint import ENV
from klein_core.model import lora as lora_io

REPO = Path(__file__).resolve().parent.parent

# Moments of a 6-step run with checkpoints every 2 steps, in the order they happen: before any checkpoint, inside
# the first state's write, between a state and its LoRA file, in the middle of a checkpoint's health work (after
# the validation pass), inside a LoRA file's write, and between checkpoints.
KILL_POINTS = [
    "training_step@1",
    "partial:training_state.pt",
    "state@2",
    "health@4",
    "partial:klein_lora_step000004.safetensors",
    "training_step@5",
]


def train_args(tiny_diffusers, sample_dataset, out: Path, cache: Path) -> list[str]:
    return [
        "train",
        "--model",
        str(tiny_diffusers),
        "--images",
        str(sample_dataset),
        "--trigger",
        "kleinchar",
        "--out",
        str(out),
        "--resolution",
        "64",
        "--training-steps",
        "6",
        "--save-every",
        "2",
        "--rank",
        "4",
        "--lr",
        "0.001",
        "--warmup-steps",
        "2",
        "--cache-dir",
        str(cache),
    ]


def killed_run(args: list[str], kill_at: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **{ENV: kill_at})
    code = "import sys; from klein_core.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=1800)


def assert_no_partial_file(run_dir: Path) -> None:
    """Every file a reader sees is whole: each LoRA reads, run.json parses (a kill's temporary files are hidden)."""
    for path in run_dir.glob("*.safetensors"):
        assert lora_io.read_lora_file(path)
    if (run_dir / "run.json").exists():
        json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def unbroken(tiny_diffusers, sample_dataset, tmp_path_factory, training_cache) -> Path:
    out = tmp_path_factory.mktemp("unbroken")
    assert main(train_args(tiny_diffusers, sample_dataset, out, training_cache)) == 0
    return out


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_sigkill_at_any_moment_leaves_a_run_that_resumes_to_the_unbroken_lora(
    kill_at, unbroken, tiny_diffusers, sample_dataset, tmp_path, training_cache, capsys
):
    args = train_args(tiny_diffusers, sample_dataset, tmp_path / "run", training_cache)
    killed = killed_run(args, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "run" / "klein_lora.safetensors").exists()
    assert_no_partial_file(tmp_path / "run")

    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert not list((tmp_path / "run").glob(".*.partial"))
    resumed = lora_io.read_lora_file(tmp_path / "run" / "klein_lora.safetensors")
    assert state_equal(lora_io.read_lora_file(unbroken / "klein_lora.safetensors"), resumed, atol=1e-5)
    checkpoints = json.loads((tmp_path / "run" / "run.json").read_text())["history"]["checkpoints"]
    assert [c["step"] for c in checkpoints] == [0, 2, 4, 6]
    assert all(c["validation_loss"] is not None for c in checkpoints)  # health cut off by the kill was redone


def test_without_its_state_a_run_continues_from_the_newest_checkpoint_with_a_fresh_optimizer_and_says_so(
    tiny_diffusers, sample_dataset, tmp_path, training_cache, capsys
):
    args = train_args(tiny_diffusers, sample_dataset, tmp_path / "run", training_cache)
    assert killed_run(args, "training_step@5").returncode == -signal.SIGKILL
    (tmp_path / "run" / "training_state.pt").unlink()
    capsys.readouterr()

    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "no training_state.pt: continuing from klein_lora_step000004.safetensors (training step 4)" in out
    assert "fresh optimizer and a 2-step LR warmup" in out
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["resumed_from"]["kind"] == "checkpoint"
    assert manifest["resumed_from"]["fresh_optimizer_warmup_steps"] == 2
    assert [c["step"] for c in manifest["history"]["checkpoints"]] == [0, 2, 4, 6]


def test_resume_run_alone_continues_with_the_model_dataset_and_settings_in_run_json(
    unbroken, tiny_diffusers, sample_dataset, tmp_path, training_cache, capsys
):
    args = train_args(tiny_diffusers, sample_dataset, tmp_path / "run", training_cache)
    assert killed_run(args, "training_step@3").returncode == -signal.SIGKILL
    capsys.readouterr()
    changed = [*args, "--lr", "5e-4", "--resume"]
    assert main(changed) == 2  # the full command still works, and a change still needs --allow-changes
    assert "learning_rate (0.001 -> 0.0005)" in capsys.readouterr().err

    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert "resuming" in capsys.readouterr().out
    resumed = lora_io.read_lora_file(tmp_path / "run" / "klein_lora.safetensors")
    assert state_equal(lora_io.read_lora_file(unbroken / "klein_lora.safetensors"), resumed, atol=1e-5)


# --- continue from a checkpoint and extend the dose ---------------------------------------------------------------
def extend_args(checkpoint: Path, out: Path, repeats: str, *extra: str) -> list[str]:
    return ["train", "--from-checkpoint", str(checkpoint), "--extend-repeats", repeats, "--out", str(out), *extra]


def test_extending_the_newest_state_equals_an_unbroken_run_of_the_same_total(
    tiny_diffusers, sample_dataset, tmp_path, training_cache
):
    short = [*train_args(tiny_diffusers, sample_dataset, tmp_path / "parent", training_cache)]
    short[short.index("--training-steps") + 1] = "4"
    assert main(short) == 0
    longer = [*train_args(tiny_diffusers, sample_dataset, tmp_path / "straight", training_cache)]
    longer[longer.index("--training-steps") + 1] = "7"
    assert main(longer) == 0

    # 6 images, B = G = 1: 0.5 more repeats per image = ceil(6·0.5/1) = 3 more training steps, 7 in all
    assert main(extend_args(tmp_path / "parent" / "klein_lora_step000004.safetensors", tmp_path / "more", "0.5")) == 0
    extended = lora_io.read_lora_file(tmp_path / "more" / "klein_lora.safetensors")
    assert state_equal(lora_io.read_lora_file(tmp_path / "straight" / "klein_lora.safetensors"), extended, atol=1e-5)
    manifest = json.loads((tmp_path / "more" / "run.json").read_text())
    lineage = manifest["lineage"]
    assert (lineage["parent_step"], lineage["extra_training_steps"], lineage["continued_with"]) == (4, 3, "state")
    assert Path(lineage["parent_run"]) == (tmp_path / "parent").resolve() and lineage["changed"] == []
    assert manifest["plan"]["repeats_per_image"] == pytest.approx(7 / 6)
    assert (tmp_path / "more" / "klein_lora_step000006.safetensors").exists()  # named by the cumulative step
    from safetensors import safe_open

    with safe_open(str(tmp_path / "more" / "klein_lora.safetensors"), "pt") as fh:
        metadata = fh.metadata()
    assert (metadata["training_steps"], metadata["repeats_per_image"]) == ("7", "1.17")
    assert (tmp_path / "parent" / "klein_lora_step000004.safetensors").exists()  # the parent keeps its files


def test_continuing_from_an_earlier_checkpoint_with_a_lower_lr_records_its_parent_and_warms_up(
    tiny_diffusers, sample_dataset, tmp_path, training_cache, capsys
):
    assert main(train_args(tiny_diffusers, sample_dataset, tmp_path / "parent", training_cache)) == 0
    capsys.readouterr()
    assert (
        main(
            extend_args(
                tmp_path / "parent" / "klein_lora_step000002.safetensors", tmp_path / "lower", "0.5", "--lr", "0.0005"
            )
        )
        == 0
    )
    assert "ceil(6·0.5/(1·1)) = 3 more training steps, 5 in all" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "lower" / "run.json").read_text())
    assert manifest["resumed_from"]["kind"] == "checkpoint"
    assert manifest["resumed_from"]["fresh_optimizer_warmup_steps"] == 3
    assert manifest["lineage"]["parent_step"] == 2
    assert manifest["lineage"]["changed"] == ["learning_rate (0.001 -> 0.0005)"]
    assert manifest["config"]["learning_rate"] == 0.0005
    assert sorted(p.name for p in (tmp_path / "lower").glob("*_step*.safetensors")) == [
        "klein_lora_step000004.safetensors",
        "klein_lora_step000005.safetensors",
    ]
