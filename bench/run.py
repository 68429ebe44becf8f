"""The CPU benchmark set: the trainer's and the previews' efficiency as ratios measured side by side in one run.

    python bench/run.py [--json] [--quick] [--threads N]

Everything runs the real code (``klein_core.train.loop.train``, ``sampling.denoise_base``, ``lora.LoraPatcher``) on
the tiny Klein (``klein_core.tools.tiny``: 2 double + 2 single blocks, hidden 128, the real 512 text tokens) with the
generated sample dataset at 64 px. At 64 px a training step is ~0.2-0.3 s of real compute (528 tokens through 4
blocks), so Python overhead does not dominate. The RSS measure uses a larger model (text encoder 22 M parameters =
88 MB fp32, transformer 26 M = 103 MB), so the two phases are of comparable size, as in Klein (16 GB encoder, 17 GB
transformer); the RSS of the imported libraries (~0.7 GB) is common to both.

Ratios and their goals:

* ``loop_overhead``: the trainer's training step / a bare forward + backward + AdamW step of a separate LoRA model
  of the same config on the same micro-batches, the median of the per-step ratios; goal <= 1.10. (The bare step is
  what any trainer must do; the rest is ours.) The two run interleaved, step by step, inside the same training run
  (the bare step's time is subtracted from the trainer's step it ran in), so load changes on shared cores hit both.
* ``cache_reuse``: wall time of the encode phase (text encoder + VAE, through the on-disk cache) of a second run on
  the same dataset / the first run's; goal <= 0.5. The whole runs' wall times are reported beside it, but the tiny
  encoders cost ~2 s of a ~10 s run here (Klein's text encoder alone is a 16 GB load and ~8 TFLOP per caption), so
  the encode phase is the figure that carries over.
* ``text_encoder_calls_after_caching``: text-encoder loads + encode calls in the second run; goal 0.
* ``batched_cfg``: preview with cond and uncond in one batch-2 forward / two batch-1 forwards; goal <= 1.0.
* ``merged_lora``: preview with the LoRA merged into the weights / the LoRA as a peft adapter; goal <= 1.0.
* ``rss_text_encoder_released``: peak RSS of a training run that frees the text encoder before loading the
  transformer (what the trainer does) / one that keeps it; goal < 1.0. Each in its own subprocess, with
  ``MALLOC_MMAP_THRESHOLD_`` at 64 KiB so freed tensors go back to the OS as Klein's multi-MB tensors do (glibc's
  dynamic threshold would keep this small model's freed tensors on the heap). ``saved_mib`` should be about the
  text encoder's size; with Klein (16 GB encoder, 17 GB transformer) the ratio is about 0.5, here the imported
  libraries dominate.

Timings use 1 torch thread by default: on shared CI cores, multi-threaded CPU timings are erratic (oversubscribed
OpenMP threads spin), and ratios, not absolute throughput, are the point here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO_ROOT, today, versions

from klein_core.data.spec import DatasetSpec
from klein_core.model import lora as lora_io
from klein_core.model.loading import load_transformer, resolve_model
from klein_core.preview.sampling import denoise_base
from klein_core.train import loop as training
from klein_core.train import session
from klein_core.train.config import TrainCallbacks, TrainConfig
from klein_core.train.objective import flow_matching_loss

RESOLUTION = 64
RANK = 16
GOALS = {
    "loop_overhead": ("<=", 1.10),
    "cache_reuse": ("<=", 0.5),
    "text_encoder_calls_after_caching": ("==", 0),
    "batched_cfg": ("<=", 1.0),
    "merged_lora": ("<=", 1.0),
    "rss_text_encoder_released": ("<", 1.0),
}
# The RSS model: a text encoder and a transformer of comparable size, as in Klein.
RSS_TEXT_ENCODER = dict(
    hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64
)
RSS_TRANSFORMER = dict(num_attention_heads=4, joint_attention_dim=3 * 256)


def config(**changes) -> TrainConfig:
    """A TrainConfig with only the fields this TrainConfig has (the benchmark outlives small API changes)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    base = dict(
        learning_rate=1e-3, rank=RANK, save_every=0, log_every=1, seed=0, health_previews=False, validation_every=0
    )
    base.update(changes)
    return TrainConfig(**{k: v for k, v in base.items() if k in known})


def check(name: str, value: float) -> dict:
    op, goal = GOALS[name]
    passed = {"<=": value <= goal, "<": value < goal, "==": value == goal}[op]
    return {"value": value, "goal": f"{op} {goal:g}", "pass": bool(passed)}


class Probe:
    """Wraps functions of ``klein_core.train.loop`` and ``.session`` for one run: counts text-encoder use, times the
    encode phase, records the micro-batches of each training step. Restores the originals on exit."""

    def __init__(self) -> None:
        self.text_encoder_loads = 0
        self.text_encode_calls = 0
        self.encode_seconds = 0.0
        self.micro_batches: list = []
        self.held: list = []
        self.hold_text_encoder = False
        self.bare_step = None  # optional BareLoop, run on the same micro-batches inside each training step
        self.bare_times: list[float] = []

    @contextlib.contextmanager
    def installed(self):
        homes = {
            "load_text_encoder": session,
            "encode_prompts": session,
            "encode_datasets": session,
            "accumulate_gradients": training,
        }
        originals = {name: getattr(module, name) for name, module in homes.items()}
        encode_name = "encode_datasets"

        def load_text_encoder(*a, **k):
            self.text_encoder_loads += 1
            loaded = originals["load_text_encoder"](*a, **k)
            if self.hold_text_encoder:
                self.held.append(loaded)  # a trainer that never frees it
            return loaded

        def encode_prompts(*a, **k):
            self.text_encode_calls += 1
            return originals["encode_prompts"](*a, **k)

        def accumulate_gradients(transformer, micro_batches, *a, **k):
            self.micro_batches.append(micro_batches)
            if self.bare_step is not None:
                self.bare_times.append(self.bare_step(micro_batches))
            return originals["accumulate_gradients"](transformer, micro_batches, *a, **k)

        def encode(*a, **k):
            start = time.perf_counter()
            try:
                return originals[encode_name](*a, **k)
            finally:
                self.encode_seconds += time.perf_counter() - start

        replacements = {
            "load_text_encoder": load_text_encoder,
            "encode_prompts": encode_prompts,
            "accumulate_gradients": accumulate_gradients,
            encode_name: encode,
        }
        for name, fn in replacements.items():
            setattr(homes[name], name, fn)
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(homes[name], name, fn)


def run_training(model_dir: Path, dataset: Path, out: Path, cache: Path, training_steps: int, probe: Probe) -> dict:
    """One real ``train()`` call; returns wall time and the per-training-step times (from the step callback)."""
    stamps: list[float] = []
    callbacks = TrainCallbacks(on_step=lambda _info: stamps.append(time.perf_counter()), log=lambda _m: None)
    spec = DatasetSpec(folder=str(dataset), trigger="kleinchar", resolutions=(RESOLUTION,))
    start = time.perf_counter()
    with probe.installed():
        result = training.train(
            resolve_model(model_dir),
            spec,
            config(training_steps=training_steps),
            out,
            callbacks=callbacks,
            cache_dir=cache,
            device="cpu",
        )
    wall = time.perf_counter() - start
    return {"wall_s": wall, "step_s": [b - a for a, b in zip(stamps, stamps[1:])], "result": result}


class BareLoop:
    """Forward + backward + AdamW of a separate LoRA model of the same config: what any trainer must do per step."""

    def __init__(self, model_dir: Path) -> None:
        self.transformer = load_transformer(resolve_model(model_dir), dtype=torch.float32, device="cpu").requires_grad_(
            False
        )
        torch.manual_seed(0)
        lora_io.add_lora(self.transformer, RANK)
        self.optimizer = torch.optim.AdamW(lora_io.lora_parameters(self.transformer), lr=1e-3)
        self.transformer.train()

    def __call__(self, micro_batches: list) -> float:
        start = time.perf_counter()
        for m in micro_batches:
            loss = flow_matching_loss(self.transformer, m.latents, m.embeds, m.noise, m.sigma) / len(micro_batches)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def loop_pairs(run: dict, probe: Probe, warmup: int) -> list[tuple[float, float]]:
    """(trainer step, bare step) per training step. The bare step ran inside the trainer's step, on its
    micro-batches, right before the trainer's own forward/backward: its time is subtracted from that step."""
    durations = run["step_s"]  # durations[i] is training step i + 2 (the first callback only starts the clock)
    bare = probe.bare_times[1:]
    return [(d - b, b) for d, b in zip(durations, bare)][max(0, warmup - 1) :]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def preview_ratios(model_dir: Path, lora_file: Path, sample_steps: int, repeats: int) -> dict:
    """Batched CFG vs two passes, and merged vs unmerged LoRA, on the same prompt, seed and sample steps. The
    variants alternate within each repeat (so load changes hit them alike) and the fastest repeat counts."""
    transformer = load_transformer(resolve_model(model_dir), dtype=torch.float32, device="cpu").requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    embeds, negative = torch.randn(512, 48, generator=g), torch.randn(512, 48, generator=g)
    weights = lora_io.read_lora_file(lora_file)
    rank = next(iter(weights.values()))[0].shape[0]
    patcher = lora_io.LoraPatcher(transformer)

    def sample(batched: bool = True):
        return denoise_base(
            transformer,
            embeds,
            negative,
            RESOLUTION,
            RESOLUTION,
            sample_steps=sample_steps,
            cfg=4.0,
            batched_cfg=batched,
        )

    @contextlib.contextmanager
    def adapter():
        lora_io.add_lora(transformer, rank, alpha=rank)
        lora_io.load_adapter_weights(transformer, weights)
        try:
            yield
        finally:
            lora_io.remove_lora(transformer)

    with patcher.applied(weights):
        merged_batched, merged_two_pass = sample(True), sample(False)  # also the warm-up
    with adapter():
        unmerged = sample(True)
    times: dict[str, list[float]] = {"batched": [], "two_pass": [], "unmerged": []}
    for _ in range(repeats):
        with patcher.applied(weights):
            times["batched"].append(timed(lambda: sample(True)))
            times["two_pass"].append(timed(lambda: sample(False)))
        with adapter():
            times["unmerged"].append(timed(lambda: sample(True)))
    return {
        "sample_steps": sample_steps,
        "cfg": 4.0,
        "repeats": repeats,
        "batched_cfg_s": min(times["batched"]),
        "two_pass_cfg_s": min(times["two_pass"]),
        "batched_vs_two_pass_max_abs_diff": (merged_batched - merged_two_pass).abs().max().item(),
        "merged_s": min(times["batched"]),
        "unmerged_s": min(times["unmerged"]),
        "merged_vs_unmerged_max_abs_diff": (merged_batched - unmerged).abs().max().item(),
    }


# --- peak RSS in subprocesses -----------------------------------------------------------------------------------------
RSS_CHILD = r"""
import json, sys
sys.path[:0] = [{bench!r}, {repo!r}]
import torch
torch.set_num_threads({threads})
import run as bench
from _common import peak_rss_mib
probe = bench.Probe()
probe.hold_text_encoder = {hold!r}
from pathlib import Path
bench.run_training(Path({model!r}), Path({dataset!r}), Path({out!r}), Path({cache!r}), 2, probe)
print(json.dumps({{
    "peak_rss_mib": peak_rss_mib(), "text_encoder_loads": probe.text_encoder_loads, "held": len(probe.held)
}}))
"""


def make_rss_model(folder: Path) -> Path:
    """A Klein-shaped diffusers folder whose text encoder (22 M) and transformer (26 M + training) are comparable."""
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from klein_core.tools import tiny

    components = list(tiny.build_tiny_components(seed=0))
    torch.manual_seed(0)
    components[0] = Flux2Transformer2DModel(**dict(tiny.TINY_TRANSFORMER_CONFIG, **RSS_TRANSFORMER)).eval()
    te_config = dict(tiny.TINY_TEXT_ENCODER_CONFIG, **RSS_TEXT_ENCODER)
    components[2] = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(components[3]), **te_config)).eval()
    tiny.write_diffusers(folder, tuple(components), distilled=False)  # the tiny factory's own writer
    return folder


def rss_measure(work: Path, model: Path, dataset: Path, threads: int) -> dict:
    te_bytes = sum(f.stat().st_size for f in (model / "text_encoder").glob("*.safetensors"))
    out: dict = {"text_encoder_fp32_mib": te_bytes / 2**20}
    for hold in (False, True):
        name = "held" if hold else "released"
        code = RSS_CHILD.format(
            bench=str(Path(__file__).parent),
            repo=str(REPO_ROOT),
            threads=threads,
            hold=hold,
            model=str(model),
            dataset=str(dataset),
            out=str(work / f"rss_{name}"),
            cache=str(work / f"rss_cache_{name}"),
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=900,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024)),
        )
        if done.returncode:
            raise RuntimeError(f"RSS child ({name}) failed:\n{done.stderr[-3000:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer training steps and sample steps (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS subprocesses")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, warmup = (6, 2) if args.quick else (16, 3)
    sample_steps, repeats = (4, 1) if args.quick else (20, 5)
    started = time.perf_counter()
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="klein-bench-") as tmp:
        work = Path(tmp)
        from klein_core.tools.sample_data import make_sample_dataset
        from klein_core.tools.tiny import make_tiny

        model = make_tiny(work / "tiny", fmt="diffusers").diffusers
        dataset = work / "dataset"
        make_sample_dataset(dataset, count=6, seed=0, size=96)

        # 1+2+3: the first run fills the cache; the second (same dataset, same cache) must not touch the encoder.
        # The bare loop runs interleaved with the trainer, step by step, so load changes hit both alike.
        first_probe, second_probe = Probe(), Probe()
        first_probe.bare_step = second_probe.bare_step = BareLoop(model)
        first = run_training(model, dataset, work / "run1", work / "cache", steps, first_probe)
        second = run_training(model, dataset, work / "run2", work / "cache", steps, second_probe)
        pairs = loop_pairs(first, first_probe, warmup) + loop_pairs(second, second_probe, warmup)
        figures["loop"] = {
            "step_ratio_median": statistics.median(t / b for t, b in pairs),
            "trainer_step_s_median": statistics.median(t for t, _ in pairs),
            "bare_step_s_median": statistics.median(b for _, b in pairs),
            "training_steps_timed": len(pairs),
        }
        figures["cache"] = {
            "first_encode_s": first_probe.encode_seconds,
            "second_encode_s": second_probe.encode_seconds,
            "first_run_wall_s": first["wall_s"],
            "second_run_wall_s": second["wall_s"],
            "training_steps_per_run": steps,
            "first_run_text_encoder_loads": first_probe.text_encoder_loads,
            "first_run_text_encode_calls": first_probe.text_encode_calls,
            "second_run_text_encoder_loads": second_probe.text_encoder_loads,
            "second_run_text_encode_calls": second_probe.text_encode_calls,
        }
        # 4+5: previews with the LoRA the first run trained.
        figures["preview"] = preview_ratios(model, first["result"].final_lora, sample_steps, repeats)
        # 6: peak RSS, each mode in a fresh process.
        if not args.no_rss:
            rss_model = make_rss_model(work / "rss_model")
            figures["rss"] = rss_measure(work, rss_model, dataset, args.threads)

    ratios = {
        "loop_overhead": check("loop_overhead", figures["loop"]["step_ratio_median"]),
        "cache_reuse": check("cache_reuse", figures["cache"]["second_encode_s"] / figures["cache"]["first_encode_s"]),
        "text_encoder_calls_after_caching": check(
            "text_encoder_calls_after_caching",
            figures["cache"]["second_run_text_encoder_loads"] + figures["cache"]["second_run_text_encode_calls"],
        ),
        "batched_cfg": check("batched_cfg", figures["preview"]["batched_cfg_s"] / figures["preview"]["two_pass_cfg_s"]),
        "merged_lora": check("merged_lora", figures["preview"]["merged_s"] / figures["preview"]["unmerged_s"]),
    }
    if "rss" in figures:
        rss = figures["rss"]
        ratios["rss_text_encoder_released"] = check(
            "rss_text_encoder_released", rss["released"]["peak_rss_mib"] / rss["held"]["peak_rss_mib"]
        )
        ratios["rss_text_encoder_released"]["saved_mib"] = rss["held"]["peak_rss_mib"] - rss["released"]["peak_rss_mib"]
        ratios["rss_text_encoder_released"]["text_encoder_fp32_mib"] = rss["text_encoder_fp32_mib"]
    report = {
        "date": today(),
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": args.threads},
        "versions": versions(),
        "model": f"tiny Klein (klein_core.tools.tiny), {RESOLUTION} px, rank {RANK}, sample dataset of 6 images",
        "quick": args.quick,
        "ratios": ratios,
        "figures": figures,
        "all_pass": all(r["pass"] for r in ratios.values()),
        "total_s": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for name, r in ratios.items():
            print(f"{name:34s} {r['value']:.3f}  goal {r['goal']:8s} {'pass' if r['pass'] else 'FAIL'}")
        print(f"total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
