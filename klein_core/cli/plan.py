"""``klein-lora plan``: steps to enter for a dose, or the dose of given steps, with the VRAM/time estimate."""

from __future__ import annotations

from pathlib import Path

from ..data.images import is_image_file
from ..errors import PlanError
from ..preset import PRESET
from ..train.estimate import VARIANTS, Mode, estimate
from ..train.memory_mode import recommend_mode
from ..train.gpu import detect_gpu_memory, detect_gpu_name
from ..train.planner import plan
from ._common import print_json


def register(sub) -> None:
    p = sub.add_parser("plan", help="compute training steps from the repeats-per-image dose")
    p.add_argument("--images", required=True, help="image count N, or a dataset folder to count")
    p.add_argument("--target-repeats", type=float, default=PRESET.target_repeats, help="target repeats per image R")
    p.add_argument("--batch-size", type=int, default=PRESET.batch_size, help="batch size B")
    p.add_argument("--grad-accum", type=int, default=PRESET.grad_accum, help="gradient accumulation G")
    p.add_argument("--training-steps", type=int, help="report the dose of these training steps S instead")
    est = p.add_argument_group("estimate", "VRAM and time of the run (a prediction; see klein_core/train/estimate.py)")
    est.add_argument("--variant", default="9B", type=str.upper, choices=sorted(VARIANTS), help="Klein Base size")
    est.add_argument("--resolution", type=int, default=PRESET.resolution, help="largest training resolution in px")
    est.add_argument("--rank", type=int, default=PRESET.rank, help="LoRA rank")
    est.add_argument("--gradient-checkpointing", action="store_true", help="estimate with per-block checkpointing")
    est.add_argument("--base-8bit", action="store_true", help="estimate with an 8-bit base")
    est.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GiB",
        help="check the fit on a GPU of this size (default: the detected one)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def count_images_arg(value: str) -> int:
    """An image count, or a folder whose images are counted."""
    if value.strip().lstrip("+-").isdigit():
        return int(value)
    folder = Path(value)
    if not folder.is_dir():
        raise PlanError(f"--images must be a number or a dataset folder; {value!r} is neither")
    return sum(1 for f in folder.iterdir() if f.is_file() and is_image_file(f))


def run(args) -> int:
    result = plan(
        images=count_images_arg(args.images),
        target_repeats=args.target_repeats,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        training_steps=args.training_steps,
    )
    report = estimate_report(args, result)
    if args.json:
        print_json({**result.as_dict(), "estimate": report})
    else:
        print(result.summary())
        print(report["summary"])
        if report["warning"]:
            print(f"warning: {report['warning']}")
        card = f" --gpu-memory {report['gpu_memory_gib']:g}" if report["gpu_memory_gib"] else " --gpu-memory GIB"
        print(
            f"every phase of this run, audited at full size: klein-lora fit-check --variant {args.variant} "
            f"--resolution {args.resolution} --rank {args.rank}{card}"
        )
    return 0


def estimate_report(args, result) -> dict:
    """The estimate of the planned run as a JSON-ready dict, with the fit on the given or detected GPU."""
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise PlanError(f"--gpu-memory must be a size in GiB > 0, got {args.gpu_memory:g}")
    mode = Mode(gradient_checkpointing=args.gradient_checkpointing, base_8bit=args.base_8bit)
    gpu_memory = args.gpu_memory if args.gpu_memory is not None else detect_gpu_memory()
    kwargs = dict(result.estimate_kwargs(), device_name=detect_gpu_name())
    the_estimate = estimate(args.variant, args.resolution, args.rank, mode, **kwargs)
    report = {
        **the_estimate.as_dict(),
        "summary": the_estimate.summary(),
        "gpu_memory_gib": gpu_memory,
        "fits": None,
        "recommended_mode": None,
        "warning": None,
    }
    if gpu_memory is not None:
        advice = recommend_mode(args.variant, args.resolution, args.rank, gpu_memory, mode, **kwargs)
        report.update(
            fits=advice.requested_fits,
            warning=advice.warning,
            recommended_mode=advice.mode.label if advice.mode else None,
        )
    return report
