"""KleinBasePreviewSampler: Base-correct previews (50 sample steps, true CFG 4) as a checkpoint x prompt grid.

Two sources: the trainer's in-memory ``KLEIN_LORA_RUN`` (its transformer, VAE and cached prompt embeddings: no
second model load), or model files plus an optional LoRA from ComfyUI's model folders. The sampling, the grid and
the exact weight restore live in ``klein_core.preview.grid``; this node only gathers inputs and reports progress.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..klein_core.facts import PIXEL_MULTIPLE
from ..klein_core.preset import PRESET
from ..klein_core.preview.grid import (
    DEFAULT_STRENGTH_SWEEP,
    PreviewSettings,
    checkpoint_from_file,
    load_for_preview,
    parse_checkpoint_spec,
    parse_strengths,
    plan_rows,
    preview_run,
    render_preview_grid,
    select_checkpoints,
    split_prompts,
    substitute_prompts,
)
from ..klein_core.preview.sampling import PreviewError, check_size
from . import memory
from .model_inputs import NONE, file_choice, full_path, resolve_choice
from .types import KleinLoraRun, fixed_seed_input

MAX_SIDE = 4096
MAX_SAMPLE_STEPS = 1000
PREVIEW_MAX_PX = 512  # size of the per-cell image shown in the progress preview
GRID_PREVIEW_MAX_PX = 2048  # the finished grid, shown last on the node
BASE_ADVICE = (
    f"Klein Base is undistilled: preview at about {PRESET.sample_steps} sample steps with CFG about {PRESET.cfg:g}; "
    "fewer steps or CFG near 1 make a good LoRA look weak or noisy."
)


def _output_dir(run) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = (
        Path(run.run_dir) / "previews"
        if run is not None
        else Path(folder_paths.get_output_directory()) / "klein_previews"
    )
    out, n = root / stamp, 1
    while out.exists():
        n += 1
        out = root / f"{stamp}-{n}"
    return out


def _side_input(side: str) -> io.Int.Input:
    return io.Int.Input(
        side,
        default=0,
        min=0,
        max=MAX_SIDE,
        step=PIXEL_MULTIPLE,
        tooltip=f"Image {side}, a multiple of {PIXEL_MULTIPLE}; 0 = the run's training resolution "
        f"({PRESET.resolution} without a run).",
    )


def _source_inputs() -> list:
    """Where the model and LoRA come from: the trainer's run, or files from ComfyUI's model folders."""
    return [
        KleinLoraRun.Input(
            "run",
            optional=True,
            tooltip="The Klein LoRA Trainer's run: its model, checkpoints and cached prompt embeddings are "
            "used directly (no second model load). When linked, the model and LoRA lists are ignored.",
        ),
        file_choice(
            "diffusion_model",
            "diffusion_models",
            "Without a run: the FLUX.2 [klein] Base diffusion model (e.g. "
            "flux-2-klein-base-9b.safetensors) from models/diffusion_models.",
        ),
        file_choice(
            "text_encoder",
            "text_encoders",
            "Without a run: the matching Qwen3 text encoder (Qwen3-8B for 9B, Qwen3-4B for 4B) from "
            "models/text_encoders. It is freed before the diffusion model loads.",
        ),
        file_choice(
            "vae",
            "vae",
            "Without a run: the FLUX.2 VAE (flux2-vae.safetensors) from models/vae.",
        ),
        file_choice(
            "lora",
            "loras",
            "Without a run: a Klein LoRA from models/loras (ours, diffusers/peft, ai-toolkit or "
            f"kohya keys). '{NONE}' renders the base model alone.",
        ),
    ]


def _grid_inputs() -> list:
    """What the grid shows: prompts (columns), sampling settings shared by every cell, and which rows."""
    return [
        io.String.Input(
            "prompts",
            multiline=True,
            default=PRESET.default_caption,
            tooltip="One prompt per line, one grid column each. [trigger] becomes the trigger word. With a "
            "run, the prompts must be among the trainer's preview prompts (empty: all of them).",
        ),
        io.String.Input(
            "trigger",
            default="",
            tooltip="Without a run: the word that replaces [trigger] (empty: the word the LoRA file "
            "records). With a run, the run's trigger word is used.",
        ),
        io.Int.Input(
            "sample_steps",
            default=PRESET.sample_steps,
            min=1,
            max=MAX_SAMPLE_STEPS,
            tooltip=f"Denoising steps per image (not training steps). Base needs about {PRESET.sample_steps}; "
            f"below {PRESET.min_base_sample_steps} a LoRA looks weak or noisy.",
        ),
        io.Float.Input(
            "cfg",
            default=PRESET.cfg,
            min=0.0,
            max=30.0,
            step=0.1,
            tooltip=f"True classifier-free guidance against the empty prompt, pred = neg + cfg*(cond - neg). "
            f"Base needs about {PRESET.cfg:g}; at {PRESET.min_base_cfg:g} or below there is no real guidance.",
        ),
        fixed_seed_input(
            PRESET.preview_seed,
            "One seed for every cell, so cells differ only by checkpoint, strength and prompt. Noise is drawn on "
            "the CPU like diffusers and ComfyUI, so the same seed gives the same image.",
        ),
        _side_input("width"),
        _side_input("height"),
        io.String.Input(
            "checkpoints",
            default="all",
            tooltip="Which of the run's checkpoints get a row: 'all', 'last', 'last N', 'none' (control "
            "only) or training steps such as '500, 1000'. The control row is always there.",
        ),
        io.String.Input(
            "strengths",
            default="",
            tooltip="Optional LoRA strength sweep of the last chosen checkpoint, e.g. "
            f"'{', '.join(f'{s:g}' for s in DEFAULT_STRENGTH_SWEEP)}'. Empty: every checkpoint at strength 1.",
        ),
    ]


class KleinBasePreviewSampler(io.ComfyNode):
    """Previews LoRA checkpoints the way Klein Base must be sampled, side by side at one seed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinBasePreviewSampler",
            display_name="Klein Base Preview Sampler",
            category="Klein LoRA/Preview",
            description=(
                "Renders a grid: rows are LoRA checkpoints (first a no-LoRA control row, step 0; then an optional "
                "strength sweep of the last checkpoint), columns are prompts, one seed for every cell. "
                f"{BASE_ADVICE} The output equals diffusers' Flux2KleinPipeline for the same seed."
            ),
            inputs=[*_source_inputs(), *_grid_inputs()],
            outputs=[
                io.Image.Output(
                    "grid",
                    display_name="grid",
                    tooltip="The labelled grid (step, strength and prompt above each cell), as one image.",
                ),
                io.Image.Output(
                    "cells",
                    display_name="cells",
                    tooltip="Every cell without labels, as a batch, row by row (control row first).",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, checkpoints=None, strengths=None) -> bool | str:
        try:
            # 0 (or a linked value, None here) means "the training resolution": check only the typed sides.
            check_size(width or PIXEL_MULTIPLE, height or PIXEL_MULTIPLE)
            if strengths is not None:
                parse_strengths(strengths)
            if checkpoints is not None:
                parse_checkpoint_spec(checkpoints)
        except PreviewError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(
        cls,
        diffusion_model: str,
        text_encoder: str,
        vae: str,
        lora: str,
        prompts: str,
        trigger: str,
        sample_steps: int,
        cfg: float,
        seed: int,
        width: int,
        height: int,
        checkpoints: str,
        strengths: str,
        run=None,
    ) -> io.NodeOutput:
        settings = PreviewSettings(width=width, height=height, sample_steps=sample_steps, cfg=cfg, seed=seed)
        sweep = parse_strengths(strengths)
        progress = _Progress()
        # Weights are swapped outside inference mode so the run's transformer never holds inference tensors.
        with torch.inference_mode(False), torch.no_grad():
            if run is not None:
                import comfy.model_management

                memory.to_device(run, comfy.model_management.get_torch_device())  # back, if ComfyUI offloaded it
                result = preview_run(
                    run,
                    split_prompts(prompts),
                    settings,
                    checkpoints,
                    sweep,
                    out_dir=_output_dir(run),
                    progress=progress.update,
                    interrupt=progress.interrupted,
                    on_cell=progress.show_cell,
                )
            else:
                result = cls._standalone(
                    diffusion_model, text_encoder, vae, lora, prompts, trigger, checkpoints, sweep, settings, progress
                )
        progress.show_grid(result.grid)
        summary = (
            f"{len(result.rows)} rows x {len(result.prompts)} prompts at {result.settings.sample_steps} sample steps, "
            f"CFG {result.settings.cfg:g}, seed {result.settings.seed}; saved to {result.grid_file.parent}"
        )
        advice = [f"  {i}. {line}" for i, line in enumerate(result.weak_lora_advice, 1)]
        if advice:
            advice.insert(0, "If the LoRA looks weak or noisy:")
        text = "\n".join([*(f"warning: {w}" for w in result.warnings), summary, *advice])
        grid = result.grid_tensor()
        return io.NodeOutput(
            grid, result.cells_tensor(), ui={**ui.PreviewImage(grid, cls=cls).as_dict(), "text": (text,)}
        )

    @classmethod
    def _standalone(
        cls, diffusion_model, text_encoder, vae, lora, prompts, trigger, checkpoints, sweep, settings, progress
    ):
        missing = [
            n
            for n, v in (("diffusion_model", diffusion_model), ("text_encoder", text_encoder), ("vae", vae))
            if v == NONE
        ]
        if missing:
            raise PreviewError(f"no model: link a KLEIN_LORA_RUN, or choose {', '.join(missing)}")
        lora_files = [] if lora == NONE else [full_path("loras", lora)]
        texts = substitute_prompts(split_prompts(prompts), trigger, lora_files)
        if not texts:
            raise PreviewError("no preview prompts: write one prompt per line")
        resolved = resolve_choice(NONE, diffusion_model, text_encoder, vae)
        settings = replace(
            settings, width=settings.width or PRESET.resolution, height=settings.height or PRESET.resolution
        )
        check_size(settings.width, settings.height)
        rows = plan_rows(select_checkpoints([checkpoint_from_file(f) for f in lora_files], checkpoints), sweep)
        import comfy.model_management  # imported when run: importing it picks a device (CUDA unless --cpu)

        loaded = load_for_preview(resolved, texts, comfy.model_management.get_torch_device())
        return render_preview_grid(
            loaded.transformer,
            loaded.vae,
            texts,
            loaded.prompt_embeds,
            loaded.negative_embeds,
            rows,
            settings,
            _output_dir(None),
            progress=progress.update,
            interrupt=progress.interrupted,
            on_cell=progress.show_cell,
        )


class _Progress:
    """ComfyUI's progress bar over every sample step of every cell, with each finished cell as the preview."""

    def __init__(self) -> None:
        self.bar = None  # comfy.utils.ProgressBar, made at the first sample step when the total is known
        self.done = 0
        self.total = 0

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            import comfy.utils

            self.bar = comfy.utils.ProgressBar(total)
        self.done, self.total = done, total
        self.bar.update_absolute(done, total)

    def show_cell(self, cell) -> None:
        if self.bar is not None:
            self.bar.update_absolute(self.done, self.total, preview=("JPEG", cell.image, PREVIEW_MAX_PX))

    def show_grid(self, grid) -> None:
        """End on the finished grid: the frontend keeps showing a node's last progress preview (over its output
        images) until the node runs again, so without this the node would keep showing the last single cell."""
        if self.bar is not None:
            self.bar.update_absolute(self.total, self.total, preview=("JPEG", grid, GRID_PREVIEW_MAX_PX))

    @staticmethod
    def interrupted() -> bool:
        # Raises ComfyUI's InterruptProcessingException on cancel; klein_core restores the weights on the way out.
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        return False
