"""``klein-lora fit-check``: will this run fit my card, in every phase? The fake-tensor audit of the real size."""

from __future__ import annotations

from ..fields import from_attributes
from ..preset import PRESET
from ..train.estimate import ASSUMED_MFU
from ._common import print_json


def register(sub) -> None:
    p = sub.add_parser("fit-check", help="audit every phase of a run at the real 9B/4B size (no weights, no GPU)")
    p.add_argument("--variant", default="9B", help="9B, 4B, or a Klein model folder or diffusion-model file")
    p.add_argument("--resolution", type=int, default=PRESET.resolution, help="largest training resolution in px")
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GiB", help="the card's memory in GiB")
    p.add_argument("--rank", type=int, default=PRESET.rank, help="LoRA rank")
    p.add_argument("--batch-size", type=int, default=PRESET.batch_size, help="batch size per GPU")
    p.add_argument("--grad-accum", type=int, default=PRESET.grad_accum, help="gradient accumulation G")
    p.add_argument("--base-8bit", action="store_true", help="the 8-bit base (low-VRAM mode)")
    gc = p.add_mutually_exclusive_group()
    gc.add_argument(
        "--gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_true",
        default=None,
        help="force gradient checkpointing (default: automatic, as the trainer decides)",
    )
    gc.add_argument(
        "--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", help="force it off"
    )
    p.add_argument("--images", type=int, default=20, help="training images N (their cached latents stay on the GPU)")
    p.add_argument("--save-every", type=int, default=PRESET.save_every, help="training steps between checkpoints")
    p.add_argument("--mfu", type=float, default=ASSUMED_MFU, help="model FLOPs utilisation for the times")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tools.fitcheck import FitCheckRequest, fit_check, render_table

    report = fit_check(from_attributes(FitCheckRequest, args, gpu_memory_gib=args.gpu_memory))
    if args.json:
        print_json(report.as_dict())
    else:
        print(render_table(report))
    return 0 if report.fits else 1
