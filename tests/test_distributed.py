"""Data parallel training (torchrun / accelerate on torch.distributed, gloo on the CPU): N processes train one LoRA,
the same one a single process trains with the global batch; they stop together and save once."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from conftest import quick_config, quick_spec
from harness.distributed import train_rank
from test_training import run

from klein_core.errors import ResumeError
from klein_core.model import lora as lora_io
from klein_core.train.resume import STATE_FILE

REPO = Path(__file__).resolve().parent.parent
TRAINING_STEPS = 3
HANG_TIMEOUT_S = 240  # far above a healthy run here; a hang would otherwise wait for gloo's 30 minutes


def config(batch_size: int, **changes):
    """Three training steps at 64 px, no step checkpoints, a one-image validation pass (it never changes the LoRA)."""
    return quick_config(
        training_steps=TRAINING_STEPS, save_every=0, batch_size=batch_size, validation_images=1, **changes
    )


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((x - y).abs().max().item() for k in a for x, y in zip(a[k], b[k]))


def torchrun_train(tiny_diffusers, sample_dataset, out: Path, cache: Path, *extra: str) -> list[str]:
    """The command a user types: torch's own launcher, two processes, the klein_core CLI, one image per process."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "klein_core",
        "train",
        *("--model", str(tiny_diffusers), "--images", str(sample_dataset), "--trigger", "kleinchar"),
        *("--out", str(out), "--resolution", "64", "--rank", "4", "--lr", "0.001", "--cache-dir", str(cache)),
        *("--batch-size", "1", "--save-every", "0", "--validation-images", "1", *extra),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def spawn_two_ranks(job: dict, out: Path) -> list[dict]:
    """Two gloo ranks in processes of their own (torch.multiprocessing), each one's outcome; fails on a hang."""
    out.mkdir(parents=True, exist_ok=True)
    context = torch.multiprocessing.start_processes(
        train_rank, args=(2, free_port(), job, str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + HANG_TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {HANG_TIMEOUT_S} s: a hang")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def job(tiny_diffusers, sample_dataset, run_dir: Path, cache: Path, **changes) -> dict:
    extra = {k: changes.pop(k) for k in list(changes) if k in ("nan_on_rank", "nan_from_micro_batch")}
    extra |= {k: changes.pop(k) for k in list(changes) if k == "stop_after_micro_batches"}
    spec = quick_spec(sample_dataset)
    return {
        "model": str(tiny_diffusers),
        "spec": {"folder": spec.folder, "trigger": spec.trigger, "resolutions": spec.resolutions},
        "config": asdict(config(1, **changes)),
        "run_dir": str(run_dir),
        "cache_dir": str(cache),
        **extra,
    }


@pytest.fixture(scope="module")
def one_process_batch_2(tiny_diffusers, sample_dataset, tmp_path_factory, training_cache):
    return run(tiny_diffusers, sample_dataset, tmp_path_factory.mktemp("one_by_two"), training_cache, config=config(2))


def test_torchrun_with_two_processes_of_batch_1_writes_the_lora_of_one_process_with_batch_2(
    one_process_batch_2, tiny_diffusers, sample_dataset, tmp_path, training_cache
):
    command = torchrun_train(tiny_diffusers, sample_dataset, tmp_path, training_cache)
    done = subprocess.run(
        [*command, "--training-steps", str(TRAINING_STEPS)],
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "B=2 (1 per process x 2 processes)" in done.stdout
    assert done.stdout.count("final LoRA:") == 1  # rank 0 reports; the other rank is silent

    two_by_one = lora_io.read_lora_file(tmp_path / "klein_lora.safetensors")
    difference = max_abs_difference(lora_io.read_lora_file(one_process_batch_2.final_lora), two_by_one)
    print(f"max abs difference of the LoRA, 2 processes x batch 1 vs 1 process x batch 2: {difference:.3g}")
    assert difference < 1e-5
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert (manifest["world_size"], manifest["global_batch_size"], manifest["config"]["batch_size"]) == (2, 2, 1)
    assert manifest["plan"]["batch_size"] == 2  # the dose is planned for the global batch
    with safe_open(str(tmp_path / "klein_lora.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert (metadata["world_size"], metadata["global_batch_size"], metadata["batch_size"]) == ("2", "2", "1")


def test_a_two_process_run_resumes_on_one_process_with_the_same_global_batch_and_refuses_another(
    one_process_batch_2, tiny_diffusers, sample_dataset, tmp_path, training_cache
):
    # both ranks asked to stop in their second training step: rank 0 saves training step 1 once
    stopped = spawn_two_ranks(
        job(tiny_diffusers, sample_dataset, tmp_path / "run", training_cache, stop_after_micro_batches=1),
        tmp_path / "ranks",
    )
    assert [r["error"] for r in stopped] == ["TrainingInterrupted", "TrainingInterrupted"]
    assert "training step 1/3; saved" in stopped[0]["message"]
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=False)
    assert (state["training_step"], state["world_size"]) == (1, 2)

    with pytest.raises(ResumeError, match=r"global batch size \(1x2 -> 1x1 processes: 2 -> 1"):
        run(tiny_diffusers, sample_dataset, tmp_path / "run", training_cache, config=config(1), resume=True)
    resumed = run(tiny_diffusers, sample_dataset, tmp_path / "run", training_cache, config=config(2), resume=True)
    assert resumed.manifest["resumed_from"]["kind"] == "state"
    difference = max_abs_difference(
        lora_io.read_lora_file(one_process_batch_2.final_lora), lora_io.read_lora_file(resumed.final_lora)
    )
    assert difference < 1e-5


def test_a_non_finite_loss_on_one_rank_stops_both_at_the_same_training_step(
    tiny_diffusers, sample_dataset, tmp_path, training_cache
):
    outcomes = spawn_two_ranks(
        job(
            tiny_diffusers,
            sample_dataset,
            tmp_path / "run",
            training_cache,
            log_every=1,
            nan_on_rank=1,
            nan_from_micro_batch=2,
        ),
        tmp_path / "ranks",
    )
    assert [r["error"] for r in outcomes] == ["NonFiniteLoss", "NonFiniteLoss"]
    assert all("non-finite (NaN or inf) at training step 2," in r["message"] for r in outcomes)
    assert "Lower the learning rate" in outcomes[0]["message"]
    assert not (tmp_path / "run" / "klein_lora.safetensors").exists()


def test_sigterm_to_torchrun_stops_both_ranks_after_a_micro_batch_and_saves_one_intact_checkpoint(
    tiny_diffusers, sample_dataset, tmp_path, training_cache
):
    command = torchrun_train(tiny_diffusers, sample_dataset, tmp_path, training_cache)
    launcher = subprocess.Popen(
        [*command, "--training-steps", "200", "--log-every", "1"],
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = bytearray()
    first_step = threading.Event()

    def read() -> None:
        while chunk := os.read(launcher.stdout.fileno(), 4096):
            output.extend(chunk)
            if b"training step 1/200" in output:
                first_step.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first_step.wait(HANG_TIMEOUT_S), output.decode(errors="replace")[-3000:]
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=HANG_TIMEOUT_S)
    reader.join(timeout=10)
    text = output.decode(errors="replace")

    checkpoints = sorted(tmp_path.glob("klein_lora_step*.safetensors"))
    assert len(checkpoints) == 1, text[-3000:]
    assert f"saved {checkpoints[0]}" in text
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert checkpoints[0].name == f"klein_lora_step{state['training_step']:06d}.safetensors"
    assert max_abs_difference(lora_io.read_lora_file(checkpoints[0]), state["lora"]) == 0.0
    assert not list(tmp_path.glob(".*.partial")) and not (tmp_path / "klein_lora.safetensors").exists()
