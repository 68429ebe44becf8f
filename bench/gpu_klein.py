"""Klein LoRA training and preview speed/VRAM on a GPU: the full-size 9B and 4B with random bf16 weights.

    python bench/gpu_klein.py --variant 9B --resolution 1024 512 [--json] [--write-results]
    python bench/gpu_klein.py --variant tiny --device cpu --resolution 64 --json     # the end-to-end check on CPU

No downloads: each transformer is built on the meta device and materialised on the GPU with random weights (speed
and memory do not depend on the values). Batch 1, the trainer's own loss and gradient code
(``training.accumulate_gradients``) and fused AdamW on CUDA. For each variant x resolution it reports:

* s/training step (warm-up excluded, device synchronised), achieved TFLOP/s and MFU against the exact FLOP count of
  ``klein_core.train.estimate`` (MFU counts model FLOPs, without the recompute of checkpointing; HFU counts it too);
* peak VRAM (allocated and reserved; the CUDA context, ~0.5 GiB, comes on top) in each mode: ``no_gc``, ``gc``
  (per-block gradient checkpointing), ``compiled`` (each block through ``torch.compile``, CUDA only) and
  ``8bit_<backend>_gc`` (an int8 base with checkpointing, per installed backend: torchao / optimum-quanto;
  "not installed" otherwise). bf16 weights on CUDA, fp32 on the CPU;
* preview seconds for 50 sample steps at CFG 4 with the LoRA merged (transformer only; the VAE decode is extra),
  and, at 10 sample steps, batched CFG vs two passes and the LoRA merged vs a peft adapter (before/after ratios);
* the estimate's prediction beside each measurement.

On CUDA the training steps run with SDPA restricted to the fused kernels (flash / memory-efficient / cuDNN), so a
silent fall-back to the math kernel (T² memory) fails loudly instead of skewing the figures.
``--write-results`` merges the figures into ``bench/gpu_results.json`` and regenerates the measured table in
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
from pathlib import Path

import torch
from _common import REPO_ROOT, device_info, random_transformer, time_call, today, versions

from klein_core.model import lora as lora_io
from klein_core.model.lowvram import BACKENDS, backend_available, quantize_base_8bit
from klein_core.preview.sampling import denoise_base
from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG
from klein_core.train import estimate as est
from klein_core.train.objective import MicroBatch, accumulate_gradients

RESULTS_MD = REPO_ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- gpu_klein:begin -->", "<!-- gpu_klein:end -->"


def transformer_config(variant: str) -> dict:
    if variant == "tiny":
        return dict(TINY_TRANSFORMER_CONFIG)
    shape = est.VARIANTS[variant]
    return dict(
        TINY_TRANSFORMER_CONFIG, num_layers=shape.num_layers, num_single_layers=shape.num_single_layers,
        num_attention_heads=shape.hidden_size // shape.head_dim, joint_attention_dim=shape.joint_attention_dim,
    )


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
    return MicroBatch(latents, embeds, torch.randn(latents.shape, generator=g).to(device, dtype), torch.tensor([0.6], device=device))


def reset_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def measure_training(transformer, shape, resolution, rank, device, args, *, checkpointing: bool, compiled: bool = False, base_8bit: bool = False) -> dict:
    """s/training step and peak memory of one mode; the adapter is removed again afterwards."""
    mode = est.Mode(checkpointing, base_8bit)
    prediction = est.estimate(shape, resolution, rank, mode, device_name=args.device_name)
    model_flops = est.estimate(shape, resolution, rank, est.Mode(False, base_8bit)).training_step_tflop * 1e12
    executed_flops = prediction.training_step_tflop * 1e12
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    compiled_blocks = []
    try:
        reset_memory(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            lora_io.add_lora(transformer, rank)
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
        result = {
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
        weights = lora_io.adapter_weights(transformer)
    except torch.OutOfMemoryError as exc:
        result, weights = {"status": f"out of memory: {str(exc).splitlines()[0]}", **peak_memory(device)}, None
    finally:
        optimizer = batch = None  # noqa: F841 - free before the next mode
        transformer.eval()
        transformer.disable_gradient_checkpointing()
        lora_io.remove_lora(transformer)  # the next mode injects a fresh adapter
        for block in compiled_blocks:
            block._compiled_call_impl = None  # back to eager for the next mode
        reset_memory(device)
    result["_weights"] = weights
    return result


def measure_preview(transformer, shape, resolution, weights, device, args) -> dict:
    """Seconds of the Base sampling loop (batched CFG) with the trained LoRA merged, as previews run it."""
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, est.TEXT_TOKENS, shape.joint_attention_dim, generator=g).to(device, args.dtype)
    negative = torch.randn(1, est.TEXT_TOKENS, shape.joint_attention_dim, generator=g).to(device, args.dtype)
    prediction = est.estimate(shape, resolution, device_name=args.device_name, preview_sample_steps=args.sample_steps, preview_cfg=args.cfg)
    reset_memory(device)
    try:
        with lora_io.LoraPatcher(transformer).applied(weights), fused_attention_only(device):
            denoise_base(transformer, embeds, negative, resolution, resolution, sample_steps=1, cfg=args.cfg)  # warm-up
            seconds = time_call(lambda: denoise_base(transformer, embeds, negative, resolution, resolution, sample_steps=args.sample_steps, cfg=args.cfg), device)
    except torch.OutOfMemoryError as exc:
        return {"status": f"out of memory: {str(exc).splitlines()[0]}"}
    result = {
        "status": "ok", "sample_steps": args.sample_steps, "cfg": args.cfg, "lora": "merged", "batched_cfg": True,
        "seconds": seconds, "tflop": prediction.preview_tflop,
        "achieved_tflops": prediction.preview_tflop / seconds,
        "predicted_seconds": prediction.preview_seconds, **peak_memory(device),
    }
    if args.ratio_sample_steps > 0:
        result["ratios"] = preview_speed_ratios(transformer, embeds, negative, resolution, weights, device, args)
    return result


def preview_speed_ratios(transformer, embeds, negative, resolution, weights, device, args) -> dict:
    """Before/after of two preview speed-ups, at ``--ratio-sample-steps``: batched CFG vs two passes (LoRA merged),
    and LoRA merged vs a peft adapter (both batched)."""
    steps = args.ratio_sample_steps

    def sample(batched: bool) -> None:
        denoise_base(transformer, embeds, negative, resolution, resolution, sample_steps=steps, cfg=args.cfg, batched_cfg=batched)

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
    return {"sample_steps": steps, "batched_cfg_s": batched, "two_pass_cfg_s": two_pass, "batched_vs_two_pass": batched / two_pass,
            "merged_s": batched, "unmerged_s": unmerged, "merged_vs_unmerged": batched / unmerged}


def bench_one(variant: str, resolution: int, args) -> dict:
    config = transformer_config(variant)
    shape = est.model_shape(config) if variant == "tiny" else est.VARIANTS[variant]
    if resolution % est.PATCH_PIXELS:
        raise SystemExit(f"--resolution {resolution} is not a multiple of {est.PATCH_PIXELS}")
    out = {"variant": variant, "resolution": resolution, "rank": args.rank, "batch_size": 1,
           "image_tokens": est.image_tokens(resolution), "params": shape.params, "training": {}, "preview": None}
    transformer = random_transformer(config, args.device, args.dtype)
    modes = [("no_gc", dict(checkpointing=False)), ("gc", dict(checkpointing=True))]
    if args.compile:
        modes.append(("compiled", dict(checkpointing=False, compiled=True)))
    weights = None
    for name, kw in modes:
        result = measure_training(transformer, shape, resolution, args.rank, args.device, args, **kw)
        weights = weights or result.pop("_weights")
        result.pop("_weights", None)
        out["training"][name] = result
        log(args, f"{variant} {resolution}px {name}: {summary(result)}")
    if not args.compile:
        out["training"]["compiled"] = {"status": "skipped: CUDA only (pass --compile to force)"}
    if weights is not None and args.sample_steps > 0:
        out["preview"] = measure_preview(transformer, shape, resolution, weights, args.device, args)
        log(args, f"{variant} {resolution}px preview {args.sample_steps} sample steps CFG {args.cfg:g}: {out['preview'].get('seconds', out['preview']['status'])}")
    for backend in BACKENDS:
        name = f"8bit_{backend}_gc"
        if not backend_available(backend):
            out["training"][name] = {"status": "not installed"}
            continue
        del transformer
        reset_memory(args.device)
        transformer = random_transformer(config, args.device, args.dtype)
        quantize_base_8bit(transformer, None, backend)  # in place on the device; the bf16 copies are freed
        result = measure_training(transformer, shape, resolution, args.rank, args.device, args, checkpointing=True, base_8bit=True)
        result.pop("_weights", None)
        out["training"][name] = result
        log(args, f"{variant} {resolution}px {name}: {summary(result)}")
    del transformer
    reset_memory(args.device)
    return out


def summary(result: dict) -> str:
    if result.get("status") != "ok":
        return result.get("status", "?")
    mfu = f", MFU {result['mfu']:.0%}" if result.get("mfu") is not None else ""
    memory = f", peak {result['peak_reserved_gib']} GiB reserved" if result.get("peak_reserved_gib") is not None else ""
    return f"{result['s_per_training_step']:.3f} s/training step, {result['achieved_tflops']:.1f} TFLOP/s{mfu}{memory}"


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
            out.append({"goal": "9B 1024 no GC <= 0.40 s/training step on an H100", "value": plain["s_per_training_step"], "pass": plain["s_per_training_step"] <= 0.40})
        if gc_.get("status") == "ok" and gc_.get("peak_reserved_gib") is not None:
            out.append({"goal": "9B 1024 with GC peak <= 22 GiB", "value": gc_["peak_reserved_gib"], "pass": gc_["peak_reserved_gib"] <= 22})
        if r["preview"] and r["preview"].get("status") == "ok" and r["preview"]["sample_steps"] == 50:
            out.append({"goal": "9B 1024 preview (50 sample steps, CFG 4) <= 15 s", "value": r["preview"]["seconds"], "pass": r["preview"]["seconds"] <= 15})
    return out


# --- RESULTS.md ------------------------------------------------------------------------------------------------------
def _fmt(value, pattern="{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def results_table(runs: list[dict]) -> str:
    lines = [
        "| device | date | variant | px | mode | s/training step (predicted) | TFLOP/s | MFU | peak GiB reserved (predicted) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for r in run["results"]:
            for mode, m in r["training"].items():
                if m.get("status") != "ok":
                    lines.append(f"| {run['device']['name']} | {run['date']} | {r['variant']} | {r['resolution']} | {mode} | {m.get('status')} | | | |")
                    continue
                lines.append(
                    f"| {run['device']['name']} | {run['date']} | {r['variant']} | {r['resolution']} | {mode} | "
                    f"{_fmt(m['s_per_training_step'])} ({_fmt(m['predicted_s_per_training_step'])}) | "
                    f"{_fmt(m['achieved_tflops'], '{:.0f}')} | {_fmt(m['mfu'], '{:.0%}')} | "
                    f"{_fmt(m['peak_reserved_gib'], '{:.1f}')} ({_fmt(m['predicted_peak_gib'], '{:.1f}')}) |"
                )
            p = r.get("preview")
            if p and p.get("status") == "ok":
                lines.append(
                    f"| {run['device']['name']} | {run['date']} | {r['variant']} | {r['resolution']} | preview {p['sample_steps']} "
                    f"sample steps, CFG {p['cfg']:g}, merged LoRA | {p['seconds']:.2f} s ({_fmt(p['predicted_seconds'], '{:.2f}')} s) | "
                    f"{p['achieved_tflops']:.0f} | | |"
                )
                q = p.get("ratios")
                if q:
                    lines.append(
                        f"| {run['device']['name']} | {run['date']} | {r['variant']} | {r['resolution']} | preview ratios at "
                        f"{q['sample_steps']} sample steps | batched/two-pass CFG {q['batched_vs_two_pass']:.2f}, "
                        f"merged/unmerged LoRA {q['merged_vs_unmerged']:.2f} | | | |"
                    )
    versions_seen = {json.dumps(run["versions"], sort_keys=True) for run in runs}
    lines.append("")
    lines += [f"Versions: `{v}`" for v in sorted(versions_seen)]
    return "\n".join(lines)


def write_results(report: dict, results_md: Path) -> None:
    """Merge this run into gpu_results.json (one entry per device x variant x resolution) and regenerate the
    measured section of RESULTS.md between the gpu_klein markers."""
    from klein_core.atomic import atomic_write_bytes, atomic_write_json

    store = results_md.with_name("gpu_results.json")
    runs = json.loads(store.read_text()) if store.exists() else []
    for result in report["results"]:
        key = (report["device"]["name"], result["variant"], result["resolution"])
        runs = [
            {**run, "results": [r for r in run["results"] if (run["device"]["name"], r["variant"], r["resolution"]) != key]}
            for run in runs
        ]
    runs = [run for run in runs if run["results"]] + [report]
    atomic_write_json(store, runs)
    section = f"{BEGIN}\n{results_table(runs)}\n{END}"
    text = results_md.read_text() if results_md.exists() else f"# Benchmark results\n\n## Measured GPU figures\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n## Measured GPU figures\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    atomic_write_bytes(results_md, (head + section + tail).encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", nargs="+", default=["9B"], type=lambda v: v if v == "tiny" else v.upper(), choices=["9B", "4B", "tiny"])
    parser.add_argument("--resolution", nargs="+", type=int, default=[1024, 512])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="training steps before timing")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--sample-steps", type=int, default=50, help="preview sample steps (0: no preview)")
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--ratio-sample-steps", type=int, default=10, help="sample steps of the preview before/after ratios (0: skip)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="also time compiled blocks (default: on CUDA)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on --device cpu; shared cores make more erratic)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    parser.add_argument("--write-results", action="store_true", help="merge into bench/gpu_results.json and RESULTS.md")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu --variant tiny for the CPU check)")
    on_cuda = args.device.startswith("cuda")
    if args.threads or not on_cuda:
        torch.set_num_threads(args.threads or 1)
    args.compile = on_cuda if args.compile is None else args.compile
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: torch.bfloat16 if on_cuda else torch.float32}[args.dtype]
    device = device_info(args.device)
    args.device_name = device["name"] if on_cuda else None
    found = est.peak_tflops(args.device_name) if on_cuda else None
    args.peak = found[1] if found else None
    attention_backend = "unknown"
    with contextlib.suppress(Exception):
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        attention_backend = str(_AttentionBackendRegistry._active_backend.value)
    results = [bench_one(variant, resolution, args) for variant in args.variant for resolution in args.resolution]
    report = {
        "date": today(),
        "device": device,
        "peak_tflops": args.peak,
        "dtype": str(args.dtype).removeprefix("torch."),
        "attention": f"diffusers dispatch backend {attention_backend!r} = torch SDPA"
        + ("; fused kernels only (math excluded)" if on_cuda else " (CPU kernels)"),
        "versions": versions(),
        "results": results,
        "goals": goals(results, args.device_name),
        "note": "MFU counts model FLOPs (no checkpointing recompute) against the peak in klein_core.train.estimate.PEAK_TFLOPS",
    }
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
