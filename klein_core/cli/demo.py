"""``klein-lora demo``: the pre-trained tiny Klein + kleinchar pictures -> plan -> train -> checkpoint grid, on a
CPU."""

from __future__ import annotations

import sys
import time
from functools import partial

from ..tools.demo import DemoScale, run_demo
from ._common import print_json, show_sample_progress
from .train import progress_line


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the shipped tiny Klein that draws: data, plan, train, preview grid "
        "(about a minute)",
        description="Uses the pre-trained tiny Klein Base that ships with the pack, makes 4 pictures of kleinchar "
        "under --out (reused when there), plans 100 repeats per image, trains with the starter preset scaled to the "
        "tiny model (health previews on), renders a checkpoint grid with a no-LoRA control row at 50 sample steps and "
        "CFG 4, scores every row (part-colour likeness, pixel distance to the training pictures) and prints where the "
        "files are.",
    )
    p.add_argument("--out", default="klein-demo", help="output folder (default ./klein-demo)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout (the log goes to stderr)")
    p.set_defaults(func=run)


def _training_progress(info: dict) -> None:
    sys.stderr.write(progress_line(info))
    if info["training_step"] == info["training_steps"]:
        sys.stderr.write("\r\033[K")
    sys.stderr.flush()


def run(args) -> int:
    started = time.perf_counter()
    stream = sys.stderr if args.json else sys.stdout
    interactive = sys.stderr.isatty()

    def log(message: str) -> None:
        print(message, file=stream, flush=True)

    quarters_logged = [0]

    def quarterly(info: dict) -> None:
        """Without a terminal (a log file, CI): one line per quarter of the training steps. The loss arrives every
        few training steps (each read waits for the GPU), so a quarter is logged at the first read inside it."""
        done, total = info["training_step"], info["training_steps"]
        if done * 4 // total > quarters_logged[0]:
            quarters_logged[0] = done * 4 // total
            log(f"  training step {done}/{total}, loss {info['loss']:.3f}, {info['s_per_step']:.2f} s/training step")

    result = run_demo(
        args.out,
        DemoScale(),
        log=log,
        on_training_step=_training_progress if interactive else quarterly,
        on_sample_step=partial(show_sample_progress, indent="  ") if interactive else None,
    )
    wall = time.perf_counter() - started
    if args.json:
        print_json({**result.as_dict(), "wall_seconds": round(wall, 1)})
        return 0
    log("files:")
    log(f"  LoRA (final):     {result.final_lora}")
    if result.best_lora:
        log(f"  LoRA (best):      {result.best_lora}")
    log(f"  checkpoint grid:  {result.grid}  (cells and preview.json beside it)")
    if result.health_report:
        log(f"  health report:    {result.health_report}")
    log(f"  run manifest:     {result.manifest}")
    log(
        f"done in {wall:.0f} s. Your own run: klein-lora train --model <Klein Base folder or .safetensors> "
        "--images <photos> --trigger <word> --out <run folder>"
    )
    return 0
