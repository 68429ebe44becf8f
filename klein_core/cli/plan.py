"""``klein-lora plan``: steps to enter for a dose, or the dose of given steps."""

from __future__ import annotations

from pathlib import Path

from ..errors import PlanError
from ..planner import plan
from ..preset import PRESET
from ._common import print_json


def register(sub) -> None:
    p = sub.add_parser("plan", help="compute training steps from the repeats-per-image dose")
    p.add_argument("--images", required=True, help="image count N, or a dataset folder to count")
    p.add_argument("--target-repeats", type=float, default=PRESET.target_repeats, help="target repeats per image R")
    p.add_argument("--batch-size", type=int, default=PRESET.batch_size, help="batch size B")
    p.add_argument("--grad-accum", type=int, default=PRESET.grad_accum, help="gradient accumulation G")
    p.add_argument("--training-steps", type=int, help="report the dose of these training steps S instead")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def count_images_arg(value: str) -> int:
    """An image count, or a folder whose images are counted."""
    if value.strip().lstrip("+-").isdigit():
        return int(value)
    folder = Path(value)
    if not folder.is_dir():
        raise PlanError(f"--images must be a number or a dataset folder; {value!r} is neither")
    from ..dataset import is_image_file

    return sum(1 for f in folder.iterdir() if f.is_file() and is_image_file(f))


def run(args) -> int:
    result = plan(
        images=count_images_arg(args.images),
        target_repeats=args.target_repeats,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        training_steps=args.training_steps,
    )
    if args.json:
        print_json(result.as_dict())
    else:
        print(result.summary())
    return 0
