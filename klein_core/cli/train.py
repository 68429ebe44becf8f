"""``klein-lora train``: headless training, the same calls the ComfyUI trainer node makes."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..data.captions import REGULARIZATION_CAPTION
from ..data.spec import DatasetSpec
from ..errors import ConfigError, NonFiniteLoss
from ..fields import from_attributes
from ..model.loading import resolve_model
from ..preset import PRESET
from ..train.config import TrainCallbacks, TrainConfig
from ..train.distributed import DistributedContext
from ..train.loop import train
from ..train.resume import Extension, RunInputs, inputs_from_manifest
from ._common import add_model_args, print_json


def register(sub) -> None:
    p = sub.add_parser("train", help="train a Klein Base LoRA on a folder of images")
    add_model_args(p, required=False)
    _add_dataset_and_dose_args(p)
    _add_monitoring_args(p)
    _add_resume_args(p)
    p.add_argument("--json", action="store_true", help="print a final JSON summary")
    p.set_defaults(func=run)


def _add_dataset_and_dose_args(p) -> None:
    """The dataset, the dose and the optimisation: what a first run sets."""
    p.add_argument(
        "--images", help="dataset folder (images + optional same-stem .txt captions); required unless --resume RUN"
    )
    p.add_argument("--trigger", help="the trigger word; replaces [trigger] in captions; required unless --resume RUN")
    p.add_argument("--out", help="run folder (LoRA checkpoints, run.json, training state)")
    p.add_argument("--name", default=PRESET.output_name, help="LoRA file name stem")
    dose = p.add_mutually_exclusive_group()
    dose.add_argument("--target-repeats", type=float, default=PRESET.target_repeats, help="dose in repeats per image R")
    dose.add_argument("--training-steps", type=int, help="optimizer updates S (instead of a target dose)")
    p.add_argument("--batch-size", type=int, default=PRESET.batch_size)
    p.add_argument("--grad-accum", type=int, default=PRESET.grad_accum, help="micro-batches per training step")
    p.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default {PRESET.learning_rate:g}; {PRESET.unstable_learning_rate:g} when unstable)",
    )
    p.add_argument("--warmup-steps", type=int, default=0, help="training steps of linear LR warmup")
    p.add_argument("--rank", type=int, default=PRESET.rank)
    p.add_argument("--resolution", type=int, nargs="+", default=[PRESET.resolution], help="e.g. 1024, or 1024 768")
    p.add_argument("--default-caption", default=PRESET.default_caption)
    p.add_argument("--caption-dropout", type=float, default=PRESET.caption_dropout)
    p.add_argument("--save-every", type=int, default=PRESET.save_every, help="training steps between checkpoints")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0 = all)")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-block activation checkpointing: ~1.45x compute for a fraction of the activation memory "
        "(default: automatic, on when the estimate says the detected GPU needs it)",
    )
    p.add_argument(
        "--base-8bit",
        action="store_true",
        help="low-VRAM mode: int8 base weights with the LoRA on top (needs the [lowvram] extra: torchao)",
    )
    p.add_argument("--compile-blocks", action="store_true", help="torch.compile each transformer block (CUDA)")


def _add_monitoring_args(p) -> None:
    """Seed, logging and the checkpoint health work: previews, validation, regularization, held-out images."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--log-every",
        type=int,
        default=TrainConfig.log_every,
        help="training steps between loss reads and progress updates (each read waits for the GPU)",
    )
    p.add_argument(
        "--preview-prompt",
        action="append",
        default=[],
        metavar="PROMPT",
        help="health preview prompt ([trigger] substituted), rendered at each checkpoint for likeness and "
        "preview statistics (repeatable)",
    )
    p.add_argument(
        "--health-preview-every",
        type=int,
        metavar="K",
        help="render the health preview at every K-th checkpoint (and the last); default: automatic, at every "
        "checkpoint unless that costs more than a tenth of the training (the estimate line says which)",
    )
    p.add_argument("--stop-on-collapse", action="store_true", help="stop as soon as a collapse is detected")
    p.add_argument(
        "--validation-every", type=int, default=0, help="extra fixed-noise validation every K training steps"
    )
    p.add_argument(
        "--validation-images",
        type=int,
        default=PRESET.validation_images,
        help="training images in each checkpoint's fixed-noise validation pass (its cost: 4 forwards per image)",
    )
    p.add_argument("--regularization", metavar="DIR", help="optional folder of class images (e.g. photos of a person)")
    p.add_argument(
        "--regularization-caption",
        default=REGULARIZATION_CAPTION,
        help="caption of regularization images without a .txt",
    )
    p.add_argument(
        "--regularization-weight",
        type=float,
        default=PRESET.regularization_weight,
        help=f"loss weight of the regularization set (default {PRESET.regularization_weight:g}: low)",
    )
    p.add_argument(
        "--empty-prompt-preservation",
        type=float,
        default=TrainConfig.empty_prompt_preservation,
        metavar="WEIGHT",
        help="keep the LoRA's prediction for the empty prompt the base model's, at this loss weight (default 0: "
        "off; 1 on the tiny demo model). Real CFG guides against the empty prompt, so a LoRA that also moved it is "
        "partly subtracted in guided previews; costs about one more forward and backward per micro-batch",
    )
    p.add_argument(
        "--held-out",
        metavar="DIR",
        help="optional folder of images of the same person kept out of training (captions as in --images): "
        "their fixed-noise validation loss is recorded at every checkpoint",
    )


def _add_resume_args(p) -> None:
    """The cache and the ways to continue a run: resume to its total, or extend from a checkpoint."""
    p.add_argument("--cache-dir", help="latent/embedding cache (default ~/.cache/klein-lora or $KLEIN_LORA_CACHE)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN",
        help="continue the run in --out (or RUN) to its planned total; `--resume RUN` alone takes the model, "
        "dataset and settings from RUN/run.json",
    )
    p.add_argument(
        "--from-checkpoint",
        metavar="FILE",
        help="continue from this step checkpoint (its run.json gives the model, data and settings; --lr and "
        "--images may change) into --out, the same run folder or a new one; needs --extend-repeats",
    )
    p.add_argument(
        "--extend-repeats",
        type=float,
        metavar="R",
        help="extra repeats per image after --from-checkpoint: ceil(N*R/(B*G)) more training steps",
    )
    p.add_argument("--allow-changes", action="store_true", help="resume even though the dataset or config changed")


class _Signals:
    """SIGINT/SIGTERM ask the loop to stop after the current micro-batch; it saves the last completed step."""

    def __init__(self) -> None:
        self.stop = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, _frame) -> None:
        self.stop = True

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class _Console:
    """The progress line redraws itself in place on stderr; any other message first ends that line."""

    def __init__(self, to_stderr: bool) -> None:
        self.stream = sys.stderr if to_stderr else sys.stdout
        self.line_open = False

    def progress(self, info: dict) -> None:
        print(progress_line(info), end="", file=sys.stderr, flush=True)
        self.line_open = True

    def end_line(self) -> None:
        if self.line_open:
            print(file=sys.stderr)
            self.line_open = False

    def log(self, message: str) -> None:
        self.end_line()
        print(message, file=self.stream, flush=True)


def progress_line(info: dict) -> str:
    done, total = info["training_step"], info["training_steps"]
    bar = "#" * int(20 * done / total)
    return (
        f"\rtraining step {done}/{total} [{bar:<20}] loss {info['loss']:.4f} "
        f"{info['s_per_step']:.2f} s/step ETA {time.strftime('%H:%M:%S', time.gmtime(info['eta_s']))}"
    )


def run(args) -> int:
    run_dir = _run_folder(args)
    extend = None
    if args.from_checkpoint or args.extend_repeats is not None:
        inputs, extend = _extension_inputs(args)
    elif args.images is None and args.trigger is None and args.model is None and args.resume:
        inputs = inputs_from_manifest(run_dir, args.cache_dir)
    else:
        inputs = _inputs_from_args(args)
    console = _Console(to_stderr=args.json)  # with --json, stdout carries only the JSON summary
    with _Signals() as signals:
        callbacks = TrainCallbacks(on_step=console.progress, should_stop=lambda: signals.stop, log=console.log)
        try:
            result = train(
                inputs.resolved,
                inputs.spec,
                inputs.config,
                run_dir,
                callbacks=callbacks,
                cache_dir=inputs.cache_dir,
                preview_prompts=inputs.preview_prompts,
                regularization=inputs.regularization,
                held_out=inputs.held_out,
                resume=bool(args.resume),
                allow_changes=args.allow_changes,
                extend=extend,
            )
        except NonFiniteLoss as exc:  # a collapse: the message leads with the LR advice; --json still says what to keep
            console.end_line()
            print(f"error: {exc}", file=sys.stderr)
            if args.json:
                print_json({"final_lora": None, "run_dir": str(run_dir), **health_fields(exc.health)})
            return 1
    console.end_line()
    if not DistributedContext.from_env().is_main:
        return 0  # rank 0 reports the run
    summary = {
        "training_steps": result.plan.training_steps,
        "repeats_per_image": result.plan.repeats_per_image,
        "final_lora": str(result.final_lora),
        "checkpoints": [str(c.path) for c in result.checkpoints],
        "run_dir": str(result.run_dir),
        **health_fields(result.health),
    }
    if args.json:
        print_json(summary)
    else:
        if result.health is not None:  # its verdict was logged as the run ended
            print(f"health report: {result.health.report_path}")
        print(f"final LoRA: {summary['final_lora']}")
        print(f"run manifest: {result.run_dir / 'run.json'}")
    return 0


def _run_folder(args) -> Path:
    """``--out``, or the RUN of ``--resume RUN``; both given, they must agree."""
    named = args.resume if isinstance(args.resume, str) else None
    if named and args.out and Path(named) != Path(args.out):
        raise ConfigError(f"--resume {named} and --out {args.out} name different run folders: give one")
    if not (named or args.out):
        raise ConfigError("--out is required (the run folder), or --resume RUN to continue a run")
    return Path(named or args.out)


def _extension_inputs(args) -> tuple[RunInputs, Extension]:
    """The parent run's inputs (its run.json), with the learning rate and dataset folder the command changes."""
    if not (args.from_checkpoint and args.extend_repeats is not None):
        raise ConfigError("--from-checkpoint FILE and --extend-repeats R go together")
    if args.resume:
        raise ConfigError("--resume continues a run to its planned total; --from-checkpoint starts a continuation")
    checkpoint = Path(args.from_checkpoint)
    inputs = inputs_from_manifest(checkpoint.parent, args.cache_dir)
    if args.lr is not None:
        inputs.config = replace(inputs.config, learning_rate=args.lr)
    if args.images:
        inputs.spec = replace(inputs.spec, folder=args.images)
        inputs.spec.scan()  # dataset errors before any model work
    return inputs, Extension(checkpoint, args.extend_repeats)


def _inputs_from_args(args) -> RunInputs:
    """The full command: every check here runs before any model loads."""
    missing = [
        flag
        for flag, value in (("--model", args.model), ("--images", args.images), ("--trigger", args.trigger))
        if value is None
    ]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required (or `--resume RUN` alone, to continue a run as saved)")
    config = from_attributes(
        TrainConfig,
        args,
        output_name=args.name,
        learning_rate=args.lr if args.lr is not None else PRESET.learning_rate,
    )
    spec = DatasetSpec(
        folder=args.images,
        trigger=args.trigger,
        default_caption=args.default_caption,
        caption_dropout=args.caption_dropout,
        resolutions=tuple(args.resolution),
    )
    spec.scan()  # dataset errors before any model work
    regularization = None
    if args.regularization:
        regularization = DatasetSpec(
            folder=args.regularization,
            trigger=args.trigger,
            resolutions=tuple(args.resolution),
            default_caption=args.regularization_caption,
        ).as_regularization(args.trigger)
        regularization.scan()
    held_out = None
    if args.held_out:
        held_out = DatasetSpec(
            folder=args.held_out,
            trigger=args.trigger,
            default_caption=args.default_caption,
            caption_dropout=0.0,
            resolutions=tuple(args.resolution),
        )
        held_out.scan()
    resolved = resolve_model(args.model, args.text_encoder, args.vae, args.tokenizer)
    return RunInputs(resolved, spec, config, regularization, held_out, tuple(args.preview_prompt), args.cache_dir)


def health_fields(health) -> dict:
    """``best_checkpoint`` (a path) and ``collapse`` (null, or step, last good checkpoint and the ordered advice)."""
    if health is None:
        return {"best_checkpoint": None, "collapse": None}
    collapse = None
    if health.collapse is not None:
        collapse = {
            "step": health.collapse.began_step,
            "last_good_checkpoint": health.collapse.last_good_path,
            "advice": health.advice,
            "signals": health.collapse.signal_names,
        }
    return {
        "best_checkpoint": str(health.best_lora) if health.best_lora else None,
        "collapse": collapse,
        "verdict": health.verdict,
    }
