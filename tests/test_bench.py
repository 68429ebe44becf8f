"""The GPU benchmark runs end to end on a CPU with the tiny config, so a GPU session only has to run it.

(bench/run.py, the CPU benchmark set, is not run here: it takes minutes; benchmarks are not tests.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def gpu_klein():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_klein

        yield gpu_klein
    finally:
        sys.path.remove(str(BENCH))


TINY_QUICK = [
    sys.executable,
    str(BENCH / "gpu_klein.py"),
    "--variant",
    "tiny",
    "--device",
    "cpu",
    "--resolution",
    "64",
    "--quick",
    "--steps",
    "1",
    "--warmup",
    "1",
    "--sample-steps",
    "2",
    "--ratio-sample-steps",
    "1",
]


def figures(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gpu_benchmark_runs_end_to_end_on_cpu_with_the_tiny_config(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nhand-written text stays\n")
    command = [
        *TINY_QUICK,
        "--json",
        "--out",
        str(tmp_path / "out"),
        "--write-results",
        "--results-md",
        str(results_md),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads((tmp_path / "out" / "gpu_report.json").read_text())["results"] == report["results"]
    assert {"date", "device", "versions", "attention", "results", "goals"} <= report.keys()
    assert "SDPA" in report["attention"]
    (result,) = report["results"]
    assert (result["variant"], result["resolution"], result["image_tokens"]) == ("tiny", 64, 16)
    for mode in ("no_gc", "gc"):
        measured = result["training"][mode]
        assert measured["status"] == "ok"
        assert measured["s_per_training_step"] > 0 and measured["achieved_tflops"] > 0
        assert {
            "mfu",
            "peak_allocated_gib",
            "peak_reserved_gib",
            "predicted_s_per_training_step",
            "predicted_peak_gib",
        } <= measured.keys()
    # checkpointing recomputes the forward: more FLOPs per training step
    assert result["training"]["gc"]["tflop_per_training_step"] > result["training"]["no_gc"]["tflop_per_training_step"]
    assert result["training"]["compiled"]["status"].startswith("skipped")
    for backend in ("torchao", "quanto"):
        assert result["training"][f"8bit_{backend}_gc"]["status"] in ("ok", "not installed")
    preview = result["preview"]
    assert (
        preview["status"] == "ok"
        and preview["sample_steps"] == 2
        and preview["lora"] == "merged"
        and preview["seconds"] > 0
    )
    assert preview["ratios"]["batched_vs_two_pass"] > 0 and preview["ratios"]["merged_vs_unmerged"] > 0
    # one checkpoint's health work: K validation images x 4 sigma, one health preview, their share of save_every steps
    health = result["checkpoint_health"]
    assert (
        health["validation"]["status"] == "ok"
        and health["validation"]["forwards"] == 4 * health["validation"]["images"]
    )
    assert health["health_preview"]["status"] == "ok" and health["health_preview"]["side"] <= 64
    assert (
        0
        < health["checkpoint_work_fraction"]
        == health["seconds"] / (250 * result["training"]["gc"]["s_per_training_step"])
    )
    # the figures file: the run's header, then every figure in the order measured, the most valuable first
    rows = figures(tmp_path / "out" / "gpu_figures.jsonl")
    phases = [row["phase"] for row in rows]
    assert phases[0] == "run" and phases[-1] == "done" and rows[0]["versions"] == report["versions"]
    assert (
        phases.index("no_gc")
        < phases.index("gc")
        < phases.index("checkpoint_validation")
        < phases.index("preview")
        < phases.index("8bit_torchao_gc")
        < phases.index("preview_ratios")
    )
    assert (
        next(row for row in rows if row["phase"] == "gc")["s_per_training_step"]
        == result["training"]["gc"]["s_per_training_step"]
    )
    assert all("elapsed_s" in row for row in rows)
    # --write-results keeps the hand-written text and adds the measured table
    text = results_md.read_text()
    assert "hand-written text stays" in text and "| CPU" in text and "no_gc" in text
    assert json.loads((tmp_path / "gpu_results.json").read_text())[0]["results"][0]["variant"] == "tiny"


def test_written_results_replace_the_same_device_variant_and_resolution_only(gpu_klein, tmp_path):
    def report(device, resolution, seconds):
        mode = {
            "status": "ok",
            "s_per_training_step": seconds,
            "predicted_s_per_training_step": 0.4,
            "achieved_tflops": 400.0,
            "mfu": 0.5,
            "peak_reserved_gib": 50.0,
            "predicted_peak_gib": 51.6,
        }
        return {
            "date": "2026-01-01",
            "device": {"name": device},
            "versions": {"torch": "x"},
            "results": [{"variant": "9B", "resolution": resolution, "training": {"no_gc": mode}, "preview": None}],
        }

    results_md = tmp_path / "RESULTS.md"
    gpu_klein.write_results(report("NVIDIA H100", 1024, 0.5), results_md)
    gpu_klein.write_results(report("NVIDIA H100", 512, 0.2), results_md)
    gpu_klein.write_results(report("NVIDIA H100", 1024, 0.45), results_md)
    gpu_klein.write_results(report("NVIDIA H200", 1024, 0.4), results_md)
    text = results_md.read_text()
    assert text.count("| NVIDIA H100 | 2026-01-01 | 9B | 1024 |") == 1
    assert "0.450 (0.400)" in text and "0.500" not in text  # the newer H100 figure replaced the older one
    assert "| NVIDIA H100 | 2026-01-01 | 9B | 512 |" in text and "| NVIDIA H200 |" in text


def test_a_stopped_gpu_benchmark_keeps_the_figures_measured_before_it_stopped(tmp_path):
    """Each figure is on disk the moment it is measured: a run killed mid-way (a device time-out) leaves whole JSON
    lines for everything before, and no report."""
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*TINY_QUICK, "--out", str(out)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = out / "gpu_figures.jsonl"
    try:
        deadline = time.monotonic() + 600  # a safety net for a hung run, not a timing
        while process.poll() is None and time.monotonic() < deadline:
            if log.exists() and '"phase": "no_gc"' in log.read_text():  # the line may still be on its way: parse after
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be stopped"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    rows = figures(log)
    assert [row["phase"] for row in rows][:3] == ["run", "materialise", "no_gc"]
    assert rows[2]["status"] == "ok" and rows[2]["s_per_training_step"] > 0
    assert "done" not in [row["phase"] for row in rows] and not (out / "gpu_report.json").exists()
