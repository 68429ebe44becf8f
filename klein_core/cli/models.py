"""``klein-lora make-tiny`` and ``klein-lora check-model``."""

from __future__ import annotations

from ..model.loading import resolve_model
from ..tools.tiny import make_tiny
from ._common import add_model_args, print_json


def register(sub) -> None:
    p = sub.add_parser(
        "make-tiny",
        help="write a tiny Klein Base: random-initialised (for format tests), or --pretrained to draw",
        description="Without --pretrained: a tiny random-initialised Klein (seconds; for format and loader tests). "
        "With --pretrained: train on the CPU, from --seed, a tiny Klein Base that draws the generated world of "
        "characters (about 15 minutes on 2 cores) and write it with the part-colour reader and a manifest "
        "(sha256 per file, PSNR, colour accuracy). The demo's copy ships in klein_core/assets/tiny_klein_drawn.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="both", choices=("diffusers", "comfyui", "both"))
    p.add_argument("--distilled", action="store_true", help="mark it distilled (to exercise the guardrail)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", action="store_true", help="pre-train it on the generated world (minutes)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="with --pretrained: a few training steps of each part, to check the command runs",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="with --pretrained: data-parallel processes, one thread each (default 2, one per core of the 2-core "
        "budget, as the shipped base was made; the bytes depend on the count, the manifest records it)",
    )
    p.set_defaults(func=run_make_tiny)

    c = sub.add_parser("check-model", help="check a Klein Base model (guardrails only, no weights loaded)")
    add_model_args(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_check_model)


def run_make_tiny(args) -> int:
    if args.pretrained or args.smoke or args.processes is not None:
        return _run_pretrain(args)
    paths = make_tiny(args.out, fmt=args.format, distilled=args.distilled, seed=args.seed)
    for name, path in vars(paths).items():
        if path is not None:
            print(f"{name}: {path}")
    return 0


def _run_pretrain(args) -> int:
    from ..errors import KleinError
    from ..tools.pretrain import PRETRAIN_PROCESSES, SMOKE_BUDGET, PretrainBudget, pretrain_tiny

    if args.distilled or not args.pretrained:
        raise KleinError("--pretrained trains a Base (no --distilled); --smoke and --processes go with --pretrained")
    processes = PRETRAIN_PROCESSES if args.processes is None else args.processes
    command = f"klein-lora make-tiny --pretrained --out {args.out} --format {args.format} --seed {args.seed}"
    command += f" --processes {processes}" + (" --smoke" if args.smoke else "")
    budget = SMOKE_BUDGET if args.smoke else PretrainBudget()
    result = pretrain_tiny(args.out, budget, args.seed, args.format, command, processes=processes)
    print(f"wrote {result.out_dir} (manifest: {result.out_dir / 'manifest.json'})")
    return 0


def run_check_model(args) -> int:
    resolved = resolve_model(args.model, args.text_encoder, args.vae, args.tokenizer)
    report = {
        "format": resolved.format,
        "variant": resolved.variant.name,
        "transformer": str(resolved.transformer_path),
        "text_encoder": str(resolved.text_encoder_path),
        "vae": str(resolved.vae_path),
        "tokenizer": str(resolved.tokenizer_path),
        "warnings": resolved.warnings,
    }
    if args.json:
        print_json(report)
    else:
        print(f"OK: FLUX.2 [klein] Base {resolved.variant.name} ({resolved.format} format)")
        for key in ("transformer", "text_encoder", "vae", "tokenizer"):
            print(f"  {key}: {report[key]}")
        for warning in resolved.warnings:
            print(f"warning: {warning}")
    return 0
