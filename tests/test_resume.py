"""Kill-safety and resume: a `klein-lora train` killed with SIGKILL at any moment resumes to the unbroken result.

Cheap by design (the default suite runs on 2 shared cores): two images (a checkpoint's validation pass is 2 x 4
forwards), 4 training steps with a checkpoint every 2, one unbroken reference run shared by every case, and killed runs
forked from a process that imported the CLI once (tests/harness/kill.py)."""

import json
from pathlib import Path

import pytest
from harness.kill import killed_run
from safetensors import safe_open
from test_training import state_equal

from klein_core.atomic import PARTIAL_SUFFIX
from klein_core.cli import main
from klein_core.model import lora as lora_io
from klein_core.train.resume import continuation_summary, step_checkpoints
from klein_core.tools.sample_data import make_sample_dataset

SIGKILLED = -9
# Every kind of moment of a 4-step run with a checkpoint at training step 2, in the order they happen: before any
# checkpoint, inside the first state's write, between a state and its LoRA file, inside a LoRA file's write, in the
# middle of a checkpoint's health work (after the validation pass, before its record), between checkpoints, and inside
# the final LoRA's write.
KILL_POINTS = [
    "training_step@1",
    "partial:training_state.pt",
    "state@2",
    "partial:klein_lora_step000002.safetensors",
    "health@2",
    "training_step@3",
    "partial:klein_lora.safetensors",
]
CHECKPOINT_STEPS = [0, 2, 4]  # the untrained baseline, the checkpoint, the final training step


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two_images")
    make_sample_dataset(folder, count=2, seed=0, size=64)
    return folder


@pytest.fixture(scope="module")
def train_args(tiny_diffusers, two_images, training_cache):
    def args(out: Path, training_steps: int = 4) -> list[str]:
        return [
            "train",
            "--model",
            str(tiny_diffusers),
            "--images",
            str(two_images),
            "--trigger",
            "kleinchar",
            "--out",
            str(out),
            "--resolution",
            "64",
            "--training-steps",
            str(training_steps),
            "--save-every",
            "2",
            "--rank",
            "4",
            "--lr",
            "0.001",
            "--warmup-steps",
            "2",
            "--cache-dir",
            str(training_cache),
        ]

    return args


def assert_no_partial_file(run_dir: Path) -> None:
    """Every file a reader sees is whole: each LoRA reads, run.json parses (a kill's temporary files are hidden)."""
    for path in run_dir.glob("*.safetensors"):
        assert lora_io.read_lora_file(path)
    if (run_dir / "run.json").exists():
        json.loads((run_dir / "run.json").read_text())


def kill(args: list[str], kill_at: str, tmp_path: Path) -> None:
    """Run ``klein-lora <args>`` until it SIGKILLs itself at ``kill_at``."""
    log = tmp_path / "killed.log"
    code = killed_run(args, kill_at, log)
    assert code == SIGKILLED, f"exit code {code}: not killed at {kill_at}\n{log.read_text()[-3000:]}"


def final_lora(run_dir: Path) -> dict:
    return lora_io.read_lora_file(run_dir / "klein_lora.safetensors")


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [c["step"] for c in json.loads((run_dir / "run.json").read_text())["history"]["checkpoints"]]


@pytest.fixture(scope="module")
def unbroken(train_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unbroken")
    assert main(train_args(out)) == 0
    return out


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_sigkill_at_any_moment_leaves_a_run_that_resumes_to_the_unbroken_lora(
    kill_at, unbroken, train_args, tmp_path, capsys
):
    run = tmp_path / "run"
    kill(train_args(run), kill_at, tmp_path)
    assert not (run / "klein_lora.safetensors").exists()
    assert_no_partial_file(run)
    if kill_at.startswith("partial:"):  # the kill came inside that write: its temporary file is all it left
        assert list(run.glob(f".{kill_at.removeprefix('partial:')}.*{PARTIAL_SUFFIX}"))

    assert main([*train_args(run), "--resume"]) == 0, capsys.readouterr().err
    assert not list(run.glob(f".*{PARTIAL_SUFFIX}"))
    assert state_equal(final_lora(unbroken), final_lora(run), atol=1e-5)
    assert checkpoint_steps(run) == CHECKPOINT_STEPS
    checkpoints = json.loads((run / "run.json").read_text())["history"]["checkpoints"]
    assert all(c["validation_loss"] is not None for c in checkpoints)  # health cut off by the kill was redone


def test_without_its_state_a_run_continues_from_the_newest_checkpoint_with_a_fresh_optimizer_and_says_so(
    train_args, tmp_path, capsys
):
    run = tmp_path / "run"
    kill(train_args(run), "training_step@3", tmp_path)
    (run / "training_state.pt").unlink()
    capsys.readouterr()

    assert main([*train_args(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "no training_state.pt: continuing from klein_lora_step000002.safetensors (training step 2)" in out
    assert "fresh optimizer and a 2-step LR warmup" in out  # the 2 training steps left, under the preset's 20
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["resumed_from"]["kind"] == "checkpoint"
    assert manifest["resumed_from"]["fresh_optimizer_warmup_steps"] == 2
    assert checkpoint_steps(run) == CHECKPOINT_STEPS


def test_resume_run_alone_continues_with_the_model_dataset_and_settings_in_run_json(
    unbroken, train_args, tmp_path, capsys
):
    run = tmp_path / "run"
    kill(train_args(run), "training_step@3", tmp_path)
    capsys.readouterr()
    changed = [*train_args(run), "--lr", "5e-4", "--resume"]
    assert main(changed) == 2  # the full command still works, and a change still needs --allow-changes
    assert "learning_rate (0.001 -> 0.0005)" in capsys.readouterr().err

    assert main(["train", "--resume", str(run)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert state_equal(final_lora(unbroken), final_lora(run), atol=1e-5)


# --- continue from a checkpoint and extend the dose ---------------------------------------------------------------
def extend_args(checkpoint: Path, out: Path, repeats: str, *extra: str) -> list[str]:
    return ["train", "--from-checkpoint", str(checkpoint), "--extend-repeats", repeats, "--out", str(out), *extra]


def test_extending_the_newest_state_equals_an_unbroken_run_of_the_same_total(unbroken, train_args, tmp_path):
    assert main(train_args(tmp_path / "parent", training_steps=2)) == 0

    # 2 images, B = G = 1: 1 more repeat per image = ceil(2·1/1) = 2 more training steps, 4 in all (the unbroken run)
    assert main(extend_args(tmp_path / "parent" / "klein_lora_step000002.safetensors", tmp_path / "more", "1")) == 0
    assert state_equal(final_lora(unbroken), final_lora(tmp_path / "more"), atol=1e-5)
    manifest = json.loads((tmp_path / "more" / "run.json").read_text())
    lineage = manifest["lineage"]
    assert (lineage["parent_step"], lineage["extra_training_steps"], lineage["continued_with"]) == (2, 2, "state")
    assert Path(lineage["parent_run"]) == (tmp_path / "parent").resolve() and lineage["changed"] == []
    assert manifest["plan"]["repeats_per_image"] == pytest.approx(2.0)
    assert (tmp_path / "more" / "klein_lora_step000004.safetensors").exists()  # named by the cumulative step
    with safe_open(str(tmp_path / "more" / "klein_lora.safetensors"), "pt") as fh:
        metadata = fh.metadata()
    assert (metadata["training_steps"], metadata["repeats_per_image"]) == ("4", "2.00")
    assert (tmp_path / "parent" / "klein_lora_step000002.safetensors").exists()  # the parent keeps its files
    assert continuation_summary(manifest) == (  # the trainer node's result line
        "continued from klein_lora_step000002.safetensors (training step 2) with 1 more repeats per image (2 more "
        "training steps): exact optimizer continuation from the run's newest state (optimizer, scheduler and RNG)"
    )


def test_continuing_from_an_earlier_checkpoint_with_a_lower_lr_records_its_parent_and_warms_up(
    unbroken, tmp_path, capsys
):
    parent_files = sorted(p.name for p in unbroken.iterdir())
    capsys.readouterr()
    earlier = unbroken / "klein_lora_step000002.safetensors"  # the unbroken run's state is at training step 4
    assert main(extend_args(earlier, tmp_path / "lower", "1.5", "--lr", "0.0005")) == 0
    assert "ceil(2·1.5/(1·1)) = 3 more training steps, 5 in all" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "lower" / "run.json").read_text())
    assert manifest["resumed_from"]["kind"] == "checkpoint"
    assert manifest["resumed_from"]["fresh_optimizer_warmup_steps"] == 3
    assert manifest["lineage"]["parent_step"] == 2
    assert manifest["lineage"]["changed"] == ["learning_rate (0.001 -> 0.0005)"]
    assert manifest["config"]["learning_rate"] == 0.0005
    assert sorted(p.name for p in (tmp_path / "lower").glob("*_step*.safetensors")) == [
        "klein_lora_step000004.safetensors",  # every 2 training steps, counted from the parent's start
        "klein_lora_step000005.safetensors",
    ]
    assert sorted(p.name for p in unbroken.iterdir()) == parent_files  # the parent run is left as it was
    summary = continuation_summary(manifest)
    assert "fresh optimizer with a 3-step LR warmup" in summary
    assert summary.endswith("changed: learning_rate (0.001 -> 0.0005)")


def test_the_continue_from_list_holds_the_step_checkpoints_of_run_folders(tmp_path):
    runs = tmp_path / "klein_lora"
    files = ("anna/run.json", "anna/anna_step000002.safetensors", "anna/anna.safetensors",
             "anna/anna_best.safetensors", "loose/loose_step000004.safetensors")  # fmt: skip
    for name in files:
        (runs / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / name).write_bytes(b"")
    # the final and best LoRA are no step checkpoints; without its run.json a run cannot be continued
    assert step_checkpoints(runs) == ["anna/anna_step000002.safetensors"]
    assert step_checkpoints(tmp_path / "no_runs_yet") == []
