"""``klein-lora preview``: a Base-correct checkpoint x prompt grid from model files and LoRA files.

Order of work keeps memory low: load the text encoder, encode the prompts and ``""``, free it, then load the
transformer and the VAE and render the grid (control row first, one seed for every cell).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..fields import from_attributes
from ..model.loading import resolve_model
from ..preset import PRESET
from ..preview.grid import (
    PreviewSettings,
    checkpoint_from_file,
    load_for_preview,
    plan_rows,
    render_preview_grid,
    substitute_prompts,
)
from ..preview.sampling import PreviewError, check_size
from ._common import add_model_args, print_json, show_sample_progress


def register(sub) -> None:
    p = sub.add_parser(
        "preview",
        help="render a checkpoint x prompt grid at Base-correct settings (50 sample steps, CFG 4, one seed)",
        description="Rows: a no-LoRA control (step 0), each --lora at strength 1, then the --strengths sweep of the "
        "last --lora. Columns: the prompts. Writes cell PNGs, grid.png and preview.json to --out.",
    )
    add_model_args(p)
    p.add_argument(
        "--lora",
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="LoRA file(s) in any supported Klein key format (none: the base model alone)",
    )
    p.add_argument("--prompt", action="append", required=True, help="a preview prompt; repeat for more columns")
    p.add_argument("--trigger", help="replaces [trigger] in prompts (default: the LoRA's recorded trigger word)")
    p.add_argument(
        "--sample-steps",
        type=int,
        default=PRESET.sample_steps,
        help=f"denoising steps per image (default {PRESET.sample_steps}; Base needs about 50)",
    )
    p.add_argument(
        "--cfg", type=float, default=PRESET.cfg, help=f"true classifier-free guidance (default {PRESET.cfg:g})"
    )
    p.add_argument("--seed", type=int, default=PRESET.preview_seed, help="one seed for every cell")
    p.add_argument("--width", type=int, default=PRESET.resolution, help="multiple of 16")
    p.add_argument("--height", type=int, default=PRESET.resolution, help="multiple of 16")
    p.add_argument(
        "--strengths",
        type=float,
        nargs="*",
        default=[],
        help="LoRA strength sweep of the last --lora, e.g. 0.6 0.8 1.0 1.2",
    )
    p.add_argument("--two-pass-cfg", action="store_true", help="run cond and uncond as separate forwards (less memory)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder for the PNGs, grid.png and preview.json")
    p.add_argument("--json", action="store_true", help="print the file listing as JSON")
    p.set_defaults(func=run_preview)


def run_preview(args) -> int:
    # Everything that can be wrong with the inputs is reported before any weights are loaded.
    check_size(args.width, args.height)
    if args.sample_steps < 1:
        raise PreviewError(
            f"--sample-steps {args.sample_steps}: must be at least 1 (Base wants about {PRESET.sample_steps})"
        )
    prompts = substitute_prompts(args.prompt, args.trigger, args.lora)
    resolved = resolve_model(args.model, args.text_encoder, args.vae, args.tokenizer)
    checkpoints = [checkpoint_from_file(path) for path in args.lora]
    settings = from_attributes(PreviewSettings, args, batched_cfg=not args.two_pass_cfg)
    for warning in [*resolved.warnings, *settings.warnings()]:
        print(f"warning: {warning}", file=sys.stderr)

    loaded = load_for_preview(resolved, prompts, args.device)
    rows = plan_rows(checkpoints, args.strengths)
    out_dir = Path(args.out)
    try:
        result = render_preview_grid(
            loaded.transformer,
            loaded.vae,
            prompts,
            loaded.prompt_embeds,
            loaded.negative_embeds,
            rows,
            settings,
            out_dir,
            progress=show_sample_progress if sys.stderr.isatty() else None,
        )
    except KeyboardInterrupt:
        print("\npreview interrupted; no files were written", file=sys.stderr)
        return 130
    if args.json:
        listing = result.listing()
        listing["out_dir"] = str(out_dir.resolve())
        listing["grid"] = str(result.grid_file.resolve())
        for cell in listing["cells"]:
            cell["file"] = str((out_dir / cell["file"]).resolve())
        listing["listing"] = str(result.listing_file.resolve())
        print_json(listing)
    else:
        print(f"grid: {result.grid_file}")
        print(
            f"cells: {len(result.cells)} PNGs in {out_dir} "
            f"({len(rows)} rows x {len(prompts)} prompts, seed {args.seed})"
        )
        print(f"listing: {result.listing_file}")
    return 0
