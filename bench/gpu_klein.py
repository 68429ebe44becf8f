"""Klein LoRA training and preview speed/VRAM on a GPU: the full-size 9B and 4B with random bf16 weights.

    python bench/gpu_klein.py --quick --out DIR        # the one short run (9B, 1024 px; bench/device_run.sh runs it)
    python bench/gpu_klein.py --variant 9B --resolution 1024 512 [--json] [--write-results]
    python bench/gpu_klein.py --variant tiny --device cpu --resolution 64 --quick --out /tmp/x   # the CPU check

No downloads: each transformer is built on the meta device and materialised on the GPU with random weights (speed
and memory do not depend on the values). Batch 1, the trainer's own loss and gradient code
(``objective.accumulate_gradients``) and fused AdamW on CUDA. Per variant x resolution, most valuable first:

* s/training step (warm-up excluded, device synchronised), achieved TFLOP/s and MFU against the exact FLOP count of
  ``klein_core.train.estimate`` (MFU counts model FLOPs, without the recompute of checkpointing; HFU counts it too)
  and peak VRAM (allocated and reserved; the CUDA context, ~0.5 GiB, comes on top) in the modes ``no_gc`` and ``gc``
  (per-block gradient checkpointing); bf16 weights on CUDA, fp32 on the CPU;
* one checkpoint's health work with the training state resident (after ``gc``): the validation pass on K images and
  one health preview, and their share of ``save_every`` training steps (``checkpoint_work_fraction``);
* preview seconds for 50 sample steps at CFG 4 with the LoRA merged (transformer only; the VAE decode is extra);
* ``8bit_<backend>_gc`` (an int8 base with checkpointing, per installed backend: torchao / optimum-quanto);
* while ``--budget-s`` allows: at 10 sample steps, batched CFG vs two passes and the LoRA merged vs a peft adapter,
  then ``compiled`` (each block through ``torch.compile``, CUDA only);
* the estimate's prediction beside each measurement (the fit-check audit's: ``klein-lora fit-check --json``).

``--out DIR`` appends each figure to ``DIR/gpu_figures.jsonl`` the moment it is measured (a time-out keeps them) and
the whole report to ``DIR/gpu_report.json`` at the end. A failed figure (out of memory, a backend error) is recorded
with its reason and the run goes on. On CUDA SDPA is restricted to the fused kernels (flash / memory-efficient /
cuDNN), so a silent fall-back to the math kernel (T² memory) fails loudly instead of skewing the figures.
``--write-results`` merges the figures into ``bench/gpu_results.json`` and regenerates the table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
from _common import (
    REPO_ROOT,
    FigureLog,
    device_info,
    peak_memory,
    random_transformer,
    reset_memory,
    synchronize,
    time_call,
    today,
    versions,
)

from klein_core.facts import KLEIN_SHAPES
from klein_core.model import lora as lora_io
from klein_core.model.lowvram import BACKENDS, backend_available, quantize_base_8bit
from klein_core.preset import PRESET
from klein_core.preview.sampling import denoise_base
from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG
from klein_core.train import estimate as est
from klein_core.train.objective import VALIDATION_SIGMAS, MicroBatch, accumulate_gradients, validation_loss

RESULTS_MD = REPO_ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- gpu_klein:begin -->", "<!-- gpu_klein:end -->"
REPORT_NAME = "gpu_report.json"  # --out: the whole report, written once the run ends
QUICK_BUDGET_S = 330  # --quick: the optional figures start only while the run is inside 5.5 min
RATIOS_RESERVE_S = 30  # the preview ratios at 10 sample steps: a fresh model + ~70 forwards (~15 s on an H100 for 9B)
COMPILE_RESERVE_S = 150  # torch.compile of both block kinds, forward and backward (1-2 min), then the timed steps


def transformer_config(variant: str) -> dict:
    """The diffusers config of ``tiny`` or a released size (``9B``, ``4B``)."""
    return dict(TINY_TRANSFORMER_CONFIG) if variant == "tiny" else KLEIN_SHAPES[variant].transformer_config


def fused_attention_only(device: str):
    """On CUDA: SDPA may use flash, memory-efficient or cuDNN attention, never the math kernel."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def micro_batch(shape: est.ModelShape, resolution: int, device: str, dtype: torch.dtype) -> MicroBatch:
    side = resolution // est.PATCH_PIXELS
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 128, side, side, generator=g).to(device, dtype)
    embeds = torch.randn(1, est.TEXT_TOKENS, shape.joint_attention_dim, generator=g).to(device, dtype)
    return MicroBatch(
        latents, embeds, torch.randn(latents.shape, generator=g).to(device, dtype), torch.tensor([0.6], device=device)
    )


def failure(exc: BaseException) -> dict:
    """The status of a measurement that failed: a one-shot GPU run records it and goes on to the next figure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return {"status": f"out of memory: {str(exc).splitlines()[0]}"}
    traceback.print_exc()
    return {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


class Recorder:
    """Where one variant x resolution's figures go: the report (``out``), the figures file (at once) and the console."""

    def __init__(self, args, variant: str, resolution: int, shape: est.ModelShape):
        self.args, self.variant, self.resolution, self.shape = args, variant, resolution, shape
        self.out = {
            "variant": variant,
            "resolution": resolution,
            "rank": args.rank,
            "batch_size": 1,
            "image_tokens": est.image_tokens(resolution),
            "params": shape.params,
            "training": {},
            "checkpoint_health": {},
            "preview": None,
        }

    def keep(self, phase: str, result: dict) -> dict:
        self.args.figures.add({"variant": self.variant, "resolution": self.resolution, "phase": phase, **result})
        log(self.args, f"{self.variant} {self.resolution}px {phase}: {summary(result)}")
        return result

    def keep_training(self, name: str, result: dict) -> None:
        self.out["training"][name] = self.keep(name, result)

    def time_training(self, transformer, mode: str, **how):
        """Time the training steps of ``transformer`` in one mode (``how``: see ``measure_training``) and keep the
        figures under ``mode``; returns the adapter's weights (None if it failed)."""
        return measure_training(
            transformer,
            self.shape,
            self.resolution,
            self.args.device,
            self.args,
            partial(self.keep_training, mode),
            **how,
        )

    def time_left(self) -> float:
        budget = self.args.budget_s
        return float("inf") if budget is None else budget - self.args.figures.elapsed()


def measure_training(
    transformer,
    shape,
    resolution,
    device,
    args,
    keep,
    *,
    checkpointing: bool,
    compiled: bool = False,
    base_8bit: bool = False,
    then=None,
):
    """s/training step and peak memory of one mode, handed to ``keep`` as soon as measured; then ``then()`` runs with
    the adapter and optimizer state still resident (a checkpoint's work happens there). Returns the adapter's
    weights (None if it failed); the adapter is removed again afterwards."""
    mode = est.Mode(checkpointing, base_8bit)
    prediction = est.estimate(shape, resolution, args.rank, mode, device_name=args.device_name)
    model_flops = est.estimate(shape, resolution, args.rank, est.Mode(False, base_8bit)).training_step_tflop * 1e12
    executed_flops = prediction.training_step_tflop * 1e12
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    compiled_blocks, weights = [], None
    try:
        reset_memory(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            lora_io.add_lora(transformer, args.rank)
        if compiled:
            for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
                block.compile()  # in place, as TrainConfig.compile_blocks does
                compiled_blocks.append(block)
        optimizer = torch.optim.AdamW(lora_io.lora_parameters(transformer), lr=1e-4, fused=device.startswith("cuda"))
        batch = [micro_batch(shape, resolution, device, args.dtype)]
        transformer.train()

        def step():
            accumulate_gradients(transformer, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with fused_attention_only(device):
            warmup = time_call(step, device, args.warmup + (2 if compiled else 0))
            seconds = time_call(step, device, args.steps)
        keep(
            {
                "status": "ok",
                "s_per_training_step": seconds,
                "warmup_s_per_training_step": warmup,
                "tflop_per_training_step": executed_flops / 1e12,
                "achieved_tflops": model_flops / seconds / 1e12,
                "mfu": model_flops / seconds / (args.peak * 1e12) if args.peak else None,
                "hfu": executed_flops / seconds / (args.peak * 1e12) if args.peak else None,
                **peak_memory(device),
                "predicted_s_per_training_step": prediction.seconds_per_training_step,
                "predicted_peak_gib": round(prediction.memory.total, 2),
            }
        )
        weights = lora_io.adapter_weights(transformer)
        if then is not None:
            then(seconds)
    except Exception as exc:  # noqa: BLE001 - record it, measure the next mode
        keep({**failure(exc), **peak_memory(device)})
    finally:
        optimizer = batch = None  # noqa: F841 - free before the next mode
        transformer.eval()
        transformer.disable_gradient_checkpointing()
        lora_io.remove_lora(transformer)  # the next mode injects a fresh adapter
        for block in compiled_blocks:
            block._compiled_call_impl = None  # back to eager for the next mode
        reset_memory(device)
    return weights


def random_embeds(
    shape: est.ModelShape, device: str, dtype: torch.dtype, seed: int, count: int = 1
) -> list[torch.Tensor]:
    """``count`` stand-ins for cached prompt embeddings, (1, 512, joint dim) each."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, est.TEXT_TOKENS, shape.joint_attention_dim, generator=g).to(device, dtype) for _ in range(count)
    ]


def checkpoint_health_settings(resolution: int) -> tuple[int, int]:
    """(K training images in the validation pass, the health preview's side) as the trainer's defaults set them."""
    from klein_core.train.config import TrainConfig
    from klein_core.train.session import health_preview_size

    config = TrainConfig()
    return config.validation_images, health_preview_size(resolution, config)


def measure_checkpoint_health(transformer, shape, resolution, device, args, run: Recorder, step_seconds: float) -> None:
    """One checkpoint's health work as the trainer does it, with the training's adapter (unmerged) and optimizer
    state resident: the fixed-noise validation pass on K images (``objective.validation_loss``: K x 4 sigma forwards)
    and one health preview (``denoise_base`` at the health preview size, ``--sample-steps`` at ``--cfg``). Its share
    of the training: health seconds / (``save_every`` x this mode's s/training step)."""
    images, side = checkpoint_health_settings(resolution)
    health = run.out["checkpoint_health"]
    health["validation"] = run.keep(
        "checkpoint_validation", measure_validation(transformer, shape, resolution, images, device, args)
    )
    health["health_preview"] = run.keep(
        "checkpoint_health_preview", measure_health_preview(transformer, shape, side, device, args)
    )
    parts = [health[k].get("seconds") for k in ("validation", "health_preview")]
    if None not in parts:
        health.update(seconds=sum(parts), checkpoint_work_fraction=sum(parts) / (PRESET.save_every * step_seconds))
        run.keep(
            "checkpoint_health",
            {
                "status": "ok",
                "seconds": health["seconds"],
                "save_every": PRESET.save_every,
                "s_per_training_step": step_seconds,
                "checkpoint_work_fraction": health["checkpoint_work_fraction"],
            },
        )


def measure_validation(transformer, shape, resolution, images, device, args) -> dict:
    side = resolution // est.PATCH_PIXELS
    forwards = images * len(VALIDATION_SIGMAS)
    per_forward = est.flops(shape, resolution, args.rank)
    timing = est.estimate(
        shape, resolution, args.rank, device_name=args.device_name
    )  # its peak and MFU, as the previews'
    rate = timing.peak_tflops * 1e12 * timing.mfu if timing.peak_tflops else None
    reset_memory(device)
    try:
        g = torch.Generator().manual_seed(5)
        latents = [
            torch.randn(128, side, side, generator=g).to(device) for _ in range(images)
        ]  # cached latents are fp32
        embeds = random_embeds(shape, device, args.dtype, seed=2, count=images)
        with fused_attention_only(device):
            seconds = time_call(lambda: validation_loss(transformer, latents, embeds), device)
    except Exception as exc:  # noqa: BLE001 - record it, measure the next figure
        return {**failure(exc), "images": images, **peak_memory(device)}
    return {
        "status": "ok",
        "images": images,
        "forwards": forwards,
        "seconds": seconds,
        "predicted_seconds": forwards * (per_forward.forward + per_forward.lora_forward) / rate if rate else None,
        **peak_memory(device),
    }


def measure_health_preview(transformer, shape, side, device, args) -> dict:
    prediction = est.estimate(
        shape,
        side,
        args.rank,
        device_name=args.device_name,
        preview_sample_steps=args.sample_steps,
        preview_cfg=args.cfg,
    )
    reset_memory(device)
    transformer.eval()  # as the trainer's health preview renders
    try:
        prompt, negative = random_embeds(shape, device, args.dtype, seed=3, count=2)
        with fused_attention_only(device):
            seconds = time_call(
                lambda: denoise_base(
                    transformer, prompt, negative, side, side, sample_steps=args.sample_steps, cfg=args.cfg
                ),
                device,
            )
    except Exception as exc:  # noqa: BLE001 - record it, measure the next figure
        return {**failure(exc), "side": side, **peak_memory(device)}
    finally:
        transformer.train()
    return {
        "status": "ok",
        "side": side,
        "sample_steps": args.sample_steps,
        "cfg": args.cfg,
        "lora": "unmerged (training adapter)",
        "seconds": seconds,
        "predicted_seconds": prediction.preview_seconds,
        **peak_memory(device),
    }


def measure_preview(transformer, shape, resolution, weights, device, args) -> dict:
    """Seconds of the Base sampling loop (batched CFG) with the trained LoRA merged, as previews run it."""
    embeds, negative = random_embeds(shape, device, args.dtype, seed=1, count=2)
    prediction = est.estimate(
        shape, resolution, device_name=args.device_name, preview_sample_steps=args.sample_steps, preview_cfg=args.cfg
    )
    reset_memory(device)
    try:
        with lora_io.LoraPatcher(transformer).applied(weights), fused_attention_only(device):
            denoise_base(transformer, embeds, negative, resolution, resolution, sample_steps=1, cfg=args.cfg)  # warm-up
            seconds = time_call(
                lambda: denoise_base(
                    transformer, embeds, negative, resolution, resolution, sample_steps=args.sample_steps, cfg=args.cfg
                ),
                device,
            )
    except Exception as exc:  # noqa: BLE001 - record it, measure the next figure
        return {**failure(exc), **peak_memory(device)}
    return {
        "status": "ok",
        "sample_steps": args.sample_steps,
        "cfg": args.cfg,
        "lora": "merged",
        "batched_cfg": True,
        "seconds": seconds,
        "tflop": prediction.preview_tflop,
        "achieved_tflops": prediction.preview_tflop / seconds,
        "predicted_seconds": prediction.preview_seconds,
        **peak_memory(device),
    }


def preview_speed_ratios(transformer, shape, resolution, weights, device, args) -> dict:
    """Before/after of two preview speed-ups, at ``--ratio-sample-steps``: batched CFG vs two passes (LoRA merged),
    and LoRA merged vs a peft adapter (both batched)."""
    steps = args.ratio_sample_steps
    embeds, negative = random_embeds(shape, device, args.dtype, seed=1, count=2)

    def sample(batched: bool) -> None:
        denoise_base(
            transformer, embeds, negative, resolution, resolution, sample_steps=steps, cfg=args.cfg, batched_cfg=batched
        )

    with lora_io.LoraPatcher(transformer).applied(weights), fused_attention_only(device):
        batched = time_call(lambda: sample(True), device)
        two_pass = time_call(lambda: sample(False), device)
    rank = next(iter(weights.values()))[0].shape[0]
    lora_io.add_lora(transformer, rank, alpha=rank)
    lora_io.load_adapter_weights(transformer, weights)
    for p in lora_io.lora_parameters(transformer):
        p.data = p.data.to(args.dtype)  # an adapter in the model's dtype, as a bf16 pipeline would run it
    try:
        with torch.no_grad(), fused_attention_only(device):
            sample(True)  # warm-up
            unmerged = time_call(lambda: sample(True), device)
    finally:
        lora_io.remove_lora(transformer)
    return {
        "status": "ok",
        "sample_steps": steps,
        "batched_cfg_s": batched,
        "two_pass_cfg_s": two_pass,
        "batched_vs_two_pass": batched / two_pass,
        "merged_s": batched,
        "unmerged_s": unmerged,
        "merged_vs_unmerged": batched / unmerged,
    }


def bench_one(variant: str, resolution: int, args) -> dict:
    """The figures of one variant x resolution, most valuable first (a time-out keeps the earlier ones): the bf16
    model's training modes, one checkpoint's health work and the merged preview on the same model, then the 8-bit
    base (a fresh model, quantised in place), then, while the time budget allows, the preview ratios and compiled
    blocks (a fresh bf16 model)."""
    config = transformer_config(variant)
    shape = est.model_shape(config) if variant == "tiny" else est.VARIANTS[variant]
    if resolution % est.PATCH_PIXELS:
        raise SystemExit(f"--resolution {resolution} is not a multiple of {est.PATCH_PIXELS}")
    run = Recorder(args, variant, resolution, shape)
    transformer = materialise(config, args, run)
    weights = run.time_training(transformer, "no_gc", checkpointing=False)
    health = (
        partial(measure_checkpoint_health, transformer, shape, resolution, args.device, args, run)
        if args.health
        else None
    )
    weights = run.time_training(transformer, "gc", checkpointing=True, then=health) or weights
    del health  # it holds the bf16 model, which must be gone before the 8-bit one is measured
    if weights is not None and args.sample_steps > 0:
        run.out["preview"] = run.keep(
            "preview", measure_preview(transformer, shape, resolution, weights, args.device, args)
        )
    for backend in BACKENDS:
        del transformer
        transformer = bench_8bit(config, backend, args, run)
    del transformer
    bench_extras(config, shape, resolution, weights, args, run)
    return run.out


def materialise(config: dict, args, run: Recorder):
    """A fresh random bf16 transformer on the device; its time and memory are a figure too (a budget's fixed cost)."""
    reset_memory(args.device)
    start = time.perf_counter()
    transformer = random_transformer(config, args.device, args.dtype)
    synchronize(args.device)
    run.keep("materialise", {"status": "ok", "seconds": time.perf_counter() - start, **peak_memory(args.device)})
    return transformer


def bench_8bit(config, backend, args, run: Recorder):
    """The int8 base with checkpointing on a fresh model (quantised in place on the device); returns that model."""
    name = f"8bit_{backend}_gc"
    if not backend_available(backend):
        run.keep_training(name, {"status": "not installed"})
        return None
    reset_memory(args.device)
    transformer = random_transformer(config, args.device, args.dtype)
    start = time.perf_counter()
    try:
        quantize_base_8bit(transformer, None, backend)  # in place on the device; the bf16 copies are freed
    except Exception as exc:  # noqa: BLE001 - record it, measure the next figure
        run.keep_training(name, failure(exc))
        return transformer
    synchronize(args.device)
    run.keep(
        f"8bit_{backend}_quantise", {"status": "ok", "seconds": time.perf_counter() - start, **peak_memory(args.device)}
    )
    run.time_training(transformer, name, checkpointing=True, base_8bit=True)
    return transformer


def bench_extras(config, shape, resolution, weights, args, run: Recorder) -> None:
    """The figures worth having only while the time budget (``--budget-s``) allows: preview ratios, compiled blocks."""
    with_ratios = weights is not None and run.out["preview"] is not None and args.ratio_sample_steps > 0
    wanted = [("preview_ratios", RATIOS_RESERVE_S)] if with_ratios else []
    if args.compile:
        wanted.append(("compiled", COMPILE_RESERVE_S))
    else:
        run.keep_training("compiled", {"status": "skipped: CUDA only (pass --compile to force)"})
    transformer = None
    for name, reserve in wanted:
        if run.time_left() < reserve:
            skipped = {
                "status": f"skipped: {max(0, run.time_left()):.0f} s left of the {args.budget_s:.0f} s budget, "
                f"{name} needs ~{reserve} s"
            }
            run.keep(name, skipped) if name == "preview_ratios" else run.keep_training(name, skipped)
            continue
        transformer = transformer or materialise(config, args, run)
        if name == "preview_ratios":
            try:
                ratios = preview_speed_ratios(transformer, shape, resolution, weights, args.device, args)
            except Exception as exc:  # noqa: BLE001 - record it, measure the next figure
                ratios = failure(exc)
            run.out["preview"]["ratios"] = run.keep(name, ratios)
        else:
            run.time_training(transformer, "compiled", checkpointing=False, compiled=True)
    del transformer
    reset_memory(args.device)


def summary(result: dict) -> str:
    """One console line per figure: the measurement, then the estimate's prediction beside it."""
    if result.get("status") != "ok":
        return result.get("status", "?")
    memory = (
        f", peak {result['peak_allocated_gib']} GiB allocated / {result['peak_reserved_gib']} reserved"
        if result.get("peak_reserved_gib") is not None
        else ""
    )
    if "s_per_training_step" in result and "achieved_tflops" in result:
        mfu = f", MFU {result['mfu']:.0%}" if result.get("mfu") is not None else ""
        predicted = (
            f" (predicted {_fmt(result['predicted_s_per_training_step'])} s, "
            f"{_fmt(result['predicted_peak_gib'], '{:.1f}')} GiB)"
        )
        return (
            f"{result['s_per_training_step']:.3f} s/training step, "
            f"{result['achieved_tflops']:.1f} TFLOP/s{mfu}{memory}{predicted}"
        )
    if "checkpoint_work_fraction" in result:
        return (
            f"{result['seconds']:.2f} s = {result['checkpoint_work_fraction']:.1%} "
            f"of {result['save_every']} training steps"
        )
    if "batched_vs_two_pass" in result:
        return (
            f"batched/two-pass CFG {result['batched_vs_two_pass']:.2f}, "
            f"merged/unmerged LoRA {result['merged_vs_unmerged']:.2f}"
        )
    predicted = (
        f" (predicted {result['predicted_seconds']:.2f} s)" if result.get("predicted_seconds") is not None else ""
    )
    return f"{result['seconds']:.2f} s{predicted}{memory}"


def log(args, message: str) -> None:
    print(message, file=sys.stderr if args.json else sys.stdout, flush=True)


def goals(results: list[dict], device_name: str | None) -> list[dict]:
    """The issue's GPU goals, checked where this run measured them (only an H100 counts for the speed goal)."""
    out = []
    for r in results:
        if r["variant"] != "9B" or r["resolution"] != 1024:
            continue
        plain, gc_ = r["training"].get("no_gc", {}), r["training"].get("gc", {})
        if plain.get("status") == "ok" and device_name and "H100" in device_name:
            out.append(
                {
                    "goal": "9B 1024 no GC <= 0.40 s/training step on an H100",
                    "value": plain["s_per_training_step"],
                    "pass": plain["s_per_training_step"] <= 0.40,
                }
            )
        if gc_.get("status") == "ok" and gc_.get("peak_reserved_gib") is not None:
            out.append(
                {
                    "goal": "9B 1024 with GC peak <= 22 GiB",
                    "value": gc_["peak_reserved_gib"],
                    "pass": gc_["peak_reserved_gib"] <= 22,
                }
            )
        if r["preview"] and r["preview"].get("status") == "ok" and r["preview"]["sample_steps"] == 50:
            out.append(
                {
                    "goal": "9B 1024 preview (50 sample steps, CFG 4) <= 15 s",
                    "value": r["preview"]["seconds"],
                    "pass": r["preview"]["seconds"] <= 15,
                }
            )
    return out


# --- RESULTS.md ------------------------------------------------------------------------------------------------------
def _fmt(value, pattern="{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def results_table(runs: list[dict]) -> str:
    lines = [
        "| device | date | variant | px | mode | s/training step (predicted) | TFLOP/s | MFU "
        "| peak GiB reserved (predicted) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for r in run["results"]:
            prefix = f"| {run['device']['name']} | {run['date']} | {r['variant']} | {r['resolution']} |"
            for mode, m in r["training"].items():
                if m.get("status") != "ok":
                    lines.append(f"{prefix} {mode} | {m.get('status')} | | | |")
                    continue
                lines.append(
                    f"{prefix} {mode} | "
                    f"{_fmt(m['s_per_training_step'])} ({_fmt(m['predicted_s_per_training_step'])}) | "
                    f"{_fmt(m['achieved_tflops'], '{:.0f}')} | {_fmt(m['mfu'], '{:.0%}')} | "
                    f"{_fmt(m['peak_reserved_gib'], '{:.1f}')} ({_fmt(m['predicted_peak_gib'], '{:.1f}')}) |"
                )
            lines += preview_rows(prefix, r.get("preview") or {})
            lines += health_rows(prefix, r.get("checkpoint_health") or {})
    versions_seen = {json.dumps(run["versions"], sort_keys=True) for run in runs}
    lines.append("")
    lines += [f"Versions: `{v}`" for v in sorted(versions_seen)]
    return "\n".join(lines)


def preview_rows(prefix: str, preview: dict) -> list[str]:
    """The Base preview's time, then its batched/two-pass CFG and merged/unmerged LoRA ratios (at fewer steps)."""
    if preview.get("status") != "ok":
        return []
    seconds = f"{preview['seconds']:.2f} s ({_fmt(preview['predicted_seconds'], '{:.2f}')} s)"
    setting = f"{preview['sample_steps']} sample steps, CFG {preview['cfg']:g}, merged LoRA"
    lines = [f"{prefix} preview {setting} | {seconds} | {preview['achieved_tflops']:.0f} | | |"]
    ratios = preview.get("ratios") or {}
    if ratios.get("status") == "ok":
        compared = (
            f"batched/two-pass CFG {ratios['batched_vs_two_pass']:.2f}, "
            f"merged/unmerged LoRA {ratios['merged_vs_unmerged']:.2f}"
        )
        lines.append(f"{prefix} preview ratios at {ratios['sample_steps']} sample steps | {compared} | | | |")
    return lines


def health_rows(prefix: str, health: dict) -> list[str]:
    """The checkpoint's health work: validation pass, health preview, and their share of the training."""
    lines = []
    v, h = health.get("validation") or {}, health.get("health_preview") or {}
    if v.get("status") == "ok":
        lines.append(
            f"{prefix} checkpoint validation, {v['images']} images x 4 sigma | {v['seconds']:.2f} s "
            f"({_fmt(v['predicted_seconds'], '{:.2f}')} s) | | | {_fmt(v['peak_reserved_gib'], '{:.1f}')} |"
        )
    if h.get("status") == "ok":
        lines.append(
            f"{prefix} checkpoint health preview {h['side']} px, {h['sample_steps']} sample steps, CFG {h['cfg']:g} | "
            f"{h['seconds']:.2f} s ({_fmt(h['predicted_seconds'], '{:.2f}')} s) | | | "
            f"{_fmt(h['peak_reserved_gib'], '{:.1f}')} |"
        )
    if "checkpoint_work_fraction" in health:
        lines.append(
            f"{prefix} checkpoint work / {PRESET.save_every} GC training steps | "
            f"{health['checkpoint_work_fraction']:.1%} | | | |"
        )
    return lines


def write_results(report: dict, results_md: Path) -> None:
    """Merge this run into gpu_results.json (one entry per device x variant x resolution) and regenerate the
    measured section of RESULTS.md between the gpu_klein markers."""
    from klein_core.atomic import atomic_write_bytes, atomic_write_json

    store = results_md.with_name("gpu_results.json")
    runs = json.loads(store.read_text()) if store.exists() else []
    for result in report["results"]:
        key = (report["device"]["name"], result["variant"], result["resolution"])
        runs = [
            {
                **run,
                "results": [r for r in run["results"] if (run["device"]["name"], r["variant"], r["resolution"]) != key],
            }
            for run in runs
        ]
    runs = [run for run in runs if run["results"]] + [report]
    atomic_write_json(store, runs)
    section = f"{BEGIN}\n{results_table(runs)}\n{END}"
    text = (
        results_md.read_text()
        if results_md.exists()
        else f"# Benchmark results\n\n## Measured GPU figures\n\n{BEGIN}\n{END}\n"
    )
    if BEGIN not in text:
        text += f"\n## Measured GPU figures\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    atomic_write_bytes(results_md, (head + section + tail).encode("utf-8"))


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant",
        nargs="+",
        default=["9B"],
        type=lambda v: v if v == "tiny" else v.upper(),
        choices=["9B", "4B", "tiny"],
    )
    parser.add_argument("--resolution", nargs="+", type=int, help="default: 1024 512 (--quick: 1024)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=PRESET.rank)
    parser.add_argument("--warmup", type=int, default=2, help="training steps before timing")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument(
        "--sample-steps", type=int, default=PRESET.sample_steps, help="preview sample steps (0: no preview)"
    )
    parser.add_argument("--cfg", type=float, default=PRESET.cfg)
    parser.add_argument(
        "--ratio-sample-steps", type=int, default=10, help="sample steps of the preview before/after ratios (0: skip)"
    )
    parser.add_argument(
        "--health", action=argparse.BooleanOptionalAction, default=True, help="time one checkpoint's health work"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time compiled blocks (default: on CUDA)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the one short run: 1024 px unless --resolution, "
        f"optional figures only inside a {QUICK_BUDGET_S} s budget",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help="start the optional figures (preview ratios, compiled) only inside this many "
        f"seconds from the start (default: none; --quick: {QUICK_BUDGET_S})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"append each figure to OUT/{FigureLog.FILE_NAME} as measured, and the report to OUT/{REPORT_NAME}",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: 1 on --device cpu; shared cores make more erratic)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    parser.add_argument("--write-results", action="store_true", help="merge into bench/gpu_results.json and RESULTS.md")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu --variant tiny for the CPU check)")
    args.resolution = args.resolution or ([PRESET.resolution] if args.quick else [1024, 512])
    if args.quick and args.budget_s is None:
        args.budget_s = QUICK_BUDGET_S
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.figures = FigureLog(args.out)  # first: the budget counts from here
    on_cuda = args.device.startswith("cuda")
    if args.threads or not on_cuda:
        torch.set_num_threads(args.threads or 1)
    args.compile = on_cuda if args.compile is None else args.compile
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: torch.bfloat16 if on_cuda else torch.float32}[
        args.dtype
    ]
    device = device_info(args.device)
    args.device_name = device["name"] if on_cuda else None
    found = est.peak_tflops(args.device_name) if on_cuda else None
    args.peak = found[1] if found else None
    attention_backend = "unknown"
    with contextlib.suppress(Exception):
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        attention_backend = str(_AttentionBackendRegistry._active_backend.value)
    header = {
        "date": today(),
        "device": device,
        "peak_tflops": args.peak,
        "assumed_mfu": est.ASSUMED_MFU,
        "dtype": str(args.dtype).removeprefix("torch."),
        "attention": f"diffusers dispatch backend {attention_backend!r} = torch SDPA"
        + ("; fused kernels only (math excluded)" if on_cuda else " (CPU kernels)"),
        "versions": versions(),
        "note": "MFU counts model FLOPs (no checkpointing recompute) against the peak in "
        "klein_core.train.estimate.PEAK_TFLOPS; "
        "predicted_* come from klein_core.train.estimate; the fit-check audit's per-phase predictions: "
        "klein-lora fit-check --variant 9B --gpu-memory 80 --json",
    }
    args.figures.add({"phase": "run", **header, "argv": sys.argv[1:] if argv is None else argv})
    results = [bench_one(variant, resolution, args) for variant in args.variant for resolution in args.resolution]
    report = {**header, "results": results, "goals": goals(results, args.device_name)}
    args.figures.add({"phase": "done", "goals": report["goals"]})
    if args.out is not None:
        from klein_core.atomic import atomic_write_json

        atomic_write_json(args.out / REPORT_NAME, report)
    if args.write_results:
        write_results(report, args.results_md)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for goal in report["goals"]:
            print(f"goal: {goal['goal']}: {goal['value']:.3f} -> {'pass' if goal['pass'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
