"""``klein-lora make-tiny`` and ``klein-lora check-model``."""

from __future__ import annotations

from ..model.loading import resolve_model
from ..tools.tiny import make_tiny
from ._common import add_model_args, print_json


def register(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random-initialised Klein Base (for tests and the demo)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="both", choices=("diffusers", "comfyui", "both"))
    p.add_argument("--distilled", action="store_true", help="mark it distilled (to exercise the guardrail)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_make_tiny)

    c = sub.add_parser("check-model", help="check a Klein Base model (guardrails only, no weights loaded)")
    add_model_args(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_check_model)


def run_make_tiny(args) -> int:
    paths = make_tiny(args.out, fmt=args.format, distilled=args.distilled, seed=args.seed)
    for name, path in vars(paths).items():
        if path is not None:
            print(f"{name}: {path}")
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
