"""The GPU benchmark runs end to end on a CPU with the tiny config, so a GPU session only has to run it.

(bench/run.py, the CPU benchmark set, is not run here: it takes minutes; benchmarks are not tests.)
"""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_gpu_benchmark_runs_end_to_end_on_cpu_with_the_tiny_config(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nhand-written text stays\n")
    command = [sys.executable, str(BENCH / "gpu_klein.py"), "--variant", "tiny", "--device", "cpu", "--resolution", "64",
               "--steps", "1", "--warmup", "1", "--sample-steps", "2", "--ratio-sample-steps", "1", "--json", "--write-results", "--results-md", str(results_md)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert {"date", "device", "versions", "attention", "results", "goals"} <= report.keys()
    assert "SDPA" in report["attention"]
    (result,) = report["results"]
    assert (result["variant"], result["resolution"], result["image_tokens"]) == ("tiny", 64, 16)
    for mode in ("no_gc", "gc"):
        measured = result["training"][mode]
        assert measured["status"] == "ok"
        assert measured["s_per_training_step"] > 0 and measured["achieved_tflops"] > 0
        assert {"mfu", "peak_allocated_gib", "peak_reserved_gib", "predicted_s_per_training_step", "predicted_peak_gib"} <= measured.keys()
    # checkpointing recomputes the forward: more FLOPs per training step
    assert result["training"]["gc"]["tflop_per_training_step"] > result["training"]["no_gc"]["tflop_per_training_step"]
    assert result["training"]["compiled"]["status"].startswith("skipped")
    for backend in ("torchao", "quanto"):
        assert result["training"][f"8bit_{backend}_gc"]["status"] in ("ok", "not installed")
    preview = result["preview"]
    assert preview["status"] == "ok" and preview["sample_steps"] == 2 and preview["lora"] == "merged" and preview["seconds"] > 0
    assert preview["ratios"]["batched_vs_two_pass"] > 0 and preview["ratios"]["merged_vs_unmerged"] > 0
    # --write-results keeps the hand-written text and adds the measured table
    text = results_md.read_text()
    assert "hand-written text stays" in text and "| CPU" in text and "no_gc" in text
    assert json.loads((tmp_path / "gpu_results.json").read_text())[0]["results"][0]["variant"] == "tiny"


def test_written_results_replace_the_same_device_variant_and_resolution_only(gpu_klein, tmp_path):
    def report(device, resolution, seconds):
        mode = {"status": "ok", "s_per_training_step": seconds, "predicted_s_per_training_step": 0.4, "achieved_tflops": 400.0,
                "mfu": 0.5, "peak_reserved_gib": 50.0, "predicted_peak_gib": 51.6}
        return {"date": "2026-01-01", "device": {"name": device}, "versions": {"torch": "x"},
                "results": [{"variant": "9B", "resolution": resolution, "training": {"no_gc": mode}, "preview": None}]}

    results_md = tmp_path / "RESULTS.md"
    gpu_klein.write_results(report("NVIDIA H100", 1024, 0.5), results_md)
    gpu_klein.write_results(report("NVIDIA H100", 512, 0.2), results_md)
    gpu_klein.write_results(report("NVIDIA H100", 1024, 0.45), results_md)
    gpu_klein.write_results(report("NVIDIA H200", 1024, 0.4), results_md)
    text = results_md.read_text()
    assert text.count("| NVIDIA H100 | 2026-01-01 | 9B | 1024 |") == 1
    assert "0.450 (0.400)" in text and "0.500" not in text  # the newer H100 figure replaced the older one
    assert "| NVIDIA H100 | 2026-01-01 | 9B | 512 |" in text and "| NVIDIA H200 |" in text
