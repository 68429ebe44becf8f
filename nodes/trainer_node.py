"""KleinLoRATrainer: trains a Klein Base LoRA inside ComfyUI with the same loop as ``klein-lora train``.

The node gathers inputs, reports progress (ComfyUI's bar plus ``klein.training`` events for the live chart) and
hands the in-memory run to the preview node. Training itself is ``klein_core.train.loop.train``.

The node stays single-GPU: it trains on ComfyUI's device as one process, even if the server inherited torchrun's
``RANK``/``WORLD_SIZE``. Data parallel training on N GPUs is the CLI's, under torchrun or accelerate (README).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..klein_core.data.cache import default_cache_dir
from ..klein_core.data.captions import REGULARIZATION_CAPTION
from ..klein_core.fields import from_attributes
from ..klein_core.preset import PRESET
from ..klein_core.train.config import TrainCallbacks, TrainConfig
from ..klein_core.train.distributed import DistributedContext
from ..klein_core.train.loop import train
from ..klein_core.train.resume import Extension, continuation_summary, step_checkpoints
from . import memory
from .calculator_node import repeats_input
from .model_inputs import NONE, diffusers_choices, file_choice, resolve_choice
from .types import KleinDataset, KleinLoraRun, fixed_seed_input

EVENT = "klein.training"  # server event: {node, kind: step|checkpoint|done, ...} drawn by web/js/training_chart.js
RUN_FOLDER = "klein_lora"  # runs go to <output>/klein_lora/<output_name>/
LORA_SUBFOLDER = "klein"  # the final and best LoRA are copied to models/loras/klein/ so LoraLoader lists them


def _send(payload: dict) -> None:
    from server import PromptServer

    if PromptServer.instance is not None:
        PromptServer.instance.send_sync(EVENT, payload)


class _ComfyProgress:
    """ComfyUI's progress bar over training steps, the cancel check every micro-batch, and live chart events."""

    def __init__(self, node_id: str | None, total: int) -> None:
        import comfy.utils

        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total)
        self.lines: list[str] = []

    def on_progress(self, training_step: int, training_steps: int) -> None:
        self.bar.update_absolute(training_step, training_steps)

    def on_step(self, info: dict) -> None:  # every loss read: the chart gets each training step's loss, in batches
        _send({"node": self.node_id, "kind": "step", **info})

    def on_checkpoint(self, record) -> None:
        saved = record.as_dict()  # run.json's strict-JSON form: a non-finite value is a string, never a bare NaN
        _send(
            {
                "node": self.node_id,
                "kind": "checkpoint",
                "training_step": record.step,
                "validation_loss": saved["validation_loss"],
                "likeness": saved["likeness"],
            }
        )

    @staticmethod
    def should_stop() -> bool:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()  # raises on the user's cancel
        return False

    def log(self, message: str) -> None:
        self.lines.append(message)
        print(f"[Klein LoRA] {message}", flush=True)  # ComfyUI wraps stdout in a block-buffered writer


def _runs_root() -> Path:
    return Path(folder_paths.get_output_directory()) / RUN_FOLDER


def _continuation(continue_from: str, extra_repeats_per_image: float) -> Extension | None:
    """The chosen step checkpoint of an earlier run of this node, and the dose to add to it; None: a new run."""
    if continue_from == NONE:
        return None
    return Extension(_runs_root() / continue_from, extra_repeats_per_image)


def _inputs() -> list:
    """The node's inputs, in widget order (saved workflows store widget values by position: new ones go last)."""
    return (
        _dose_and_model_inputs()
        + _optimisation_inputs()
        + _health_inputs()
        + _continuation_inputs()
        + [_preservation_input()]
    )


def _dose_and_model_inputs() -> list:
    """The dataset, the training steps that give its dose, and the Klein Base model files."""
    return [
        KleinDataset.Input(
            "dataset", tooltip="The Klein Caption Dataset: images, captions, trigger word, resolutions."
        ),
        io.Int.Input(
            "training_steps",
            default=1000,
            min=1,
            max=1_000_000,
            tooltip="Optimizer updates S (not sample steps). Link it from the Repeats Calculator: "
            "S = ceil(N*R/(B*G)) gives every image R repeats.",
        ),
        io.Combo.Input(
            "diffusers_model",
            options=diffusers_choices(),
            default=NONE,
            tooltip="A Klein Base diffusers folder under models/diffusers (wins over the three files below).",
        ),
        file_choice(
            "diffusion_model",
            "diffusion_models",
            "FLUX.2 [klein] Base diffusion model (flux-2-klein-base-9b.safetensors or -4b). "
            "Distilled klein files are refused: LoRAs trained on them collapse.",
        ),
        file_choice(
            "text_encoder",
            "text_encoders",
            "The matching Qwen3 text encoder (Qwen3-8B for 9B, Qwen3-4B for 4B); used only "
            "to encode captions, then freed.",
        ),
        file_choice(
            "vae",
            "vae",
            "The FLUX.2 VAE (flux2-vae.safetensors).",
        ),
    ]


def _optimisation_inputs() -> list:
    """Batch, accumulation, learning rate, rank, checkpoint spacing and seed: the Klein 9B Base starter values."""
    return [
        io.Int.Input(
            "batch_size",
            default=PRESET.batch_size,
            min=1,
            max=64,
            tooltip="B: images per micro-batch. Must match the Repeats Calculator's B.",
        ),
        io.Int.Input(
            "grad_accum",
            default=PRESET.grad_accum,
            min=1,
            max=1024,
            tooltip="G: micro-batches per training step (2-4 only to save VRAM). Must match the "
            "Repeats Calculator's G, which lowers the training steps in proportion.",
        ),
        io.Float.Input(
            "learning_rate",
            default=PRESET.learning_rate,
            min=1e-7,
            max=1.0,
            step=1e-5,
            tooltip=f"AdamW learning rate: {PRESET.learning_rate:g} for Klein 9B Base; "
            f"{PRESET.unstable_learning_rate:g} when the run collapses.",
        ),
        io.Int.Input(
            "rank",
            default=PRESET.rank,
            min=1,
            max=256,
            tooltip=f"LoRA rank (alpha = rank): {PRESET.rank}; {PRESET.stable_underfit_rank} only "
            "when stable and underfitting.",
        ),
        io.Int.Input(
            "save_every",
            default=PRESET.save_every,
            min=0,
            max=100_000,
            tooltip="Training steps between LoRA checkpoints (0: only the final LoRA). Each checkpoint "
            "gets a fixed-noise validation loss for the health report.",
        ),
        fixed_seed_input(
            0,
            "Seed of noise, timesteps and batch order. Same inputs are cached by ComfyUI; change the seed to train "
            "again.",
        ),
    ]


def _health_inputs() -> list:
    """Preview prompts, file names, memory mode and the collapse fixes (regularization, held-out images)."""
    return [
        io.String.Input(
            "preview_prompts",
            multiline=True,
            default=f"{PRESET.default_caption}",
            tooltip="One prompt per line for the preview node, encoded now while the text encoder "
            "is loaded. [trigger] becomes the trigger word. The first also renders a health "
            "preview at each checkpoint (likeness, preview statistics).",
        ),
        io.String.Input(
            "output_name",
            default=PRESET.output_name,
            tooltip="LoRA file name stem: <name>_step000500.safetensors, <name>.safetensors, <name>_best.safetensors.",
        ),
        io.Boolean.Input(
            "gradient_checkpointing",
            default=False,
            tooltip="Ticked: always recompute activations per block (~1.45x compute, far less VRAM). "
            "Unticked: automatic, on only when the memory estimate says the card needs it "
            "(Klein 9B at 1024 px on a 24 GB card).",
        ),
        io.Boolean.Input(
            "stop_on_collapse",
            default=False,
            tooltip="Stop as soon as a collapse is detected (better, then chaos); the best "
            "checkpoint before it is kept.",
        ),
        KleinDataset.Input(
            "regularization",
            optional=True,
            tooltip="Optional: a second Klein Caption Dataset of class images (photos of other "
            f"people, captioned like '{REGULARIZATION_CAPTION}'; none may contain the trigger "
            "word). The third fix for a collapse. Not counted in the repeats per image.",
        ),
        KleinDataset.Input(
            "held_out",
            optional=True,
            tooltip="Optional: a Klein Caption Dataset of a few more photos of the same person, "
            "kept out of training. Their fixed-noise validation loss is recorded at every "
            "checkpoint (run.json, the report chart) and picks the best checkpoint when there "
            "is no likeness score.",
        ),
        io.Float.Input(
            "regularization_weight",
            default=PRESET.regularization_weight,
            min=0.0,
            max=1.0,
            step=0.01,
            optional=True,
            tooltip="Loss weight of the regularization images against the identity "
            f"images (default {PRESET.regularization_weight:g}: low, so they steady the run "
            "without diluting the likeness). Used only with a regularization dataset.",
        ),
    ]


def _continuation_inputs() -> list:
    """Continue from a step checkpoint with more dose: after a collapse from the last good one at a lower LR, or
    from the last one of an under-trained run."""
    return [
        io.Combo.Input(
            "continue_from",
            options=[NONE, *step_checkpoints(_runs_root())],
            default=NONE,
            optional=True,
            tooltip="(none): a new run. Or a step checkpoint this node wrote (output/klein_lora/<run>/): its LoRA "
            "continues for 'extra repeats per image' more, into the run folder of output_name (the same run or a "
            "new one); training_steps is then ignored. From the run's newest checkpoint the optimizer continues "
            "exactly; from an earlier one a fresh optimizer warms up. The rank must stay the same.",
        ),
        repeats_input(
            "extra_repeats_per_image",
            "extra repeats per image",
            PRESET.extension_repeats,
            "R: the dose added to the continue_from checkpoint, as S more training steps; the new checkpoints are "
            "named by the cumulative training step. Used only with continue_from.",
            optional=True,
        ),
    ]


def _preservation_input():
    """The empty-prompt preservation weight (after the continuation inputs: saved workflows keep their positions)."""
    return io.Float.Input(
        "empty_prompt_preservation",
        default=0.0,
        min=0.0,
        max=10.0,
        step=0.1,
        optional=True,
        tooltip="0 (off, the starter preset): plain flow matching. Above 0: a loss term, at this weight, that keeps "
        "the LoRA's prediction for the empty prompt the base model's, so real CFG (which guides against the empty "
        "prompt) shows the LoRA instead of subtracting it. One more forward and backward per micro-batch. The "
        "tiny demo model needs it (weight 1); on Klein 9B it is not measured.",
    )


class KleinLoRATrainer(io.ComfyNode):
    """Trains a character LoRA on FLUX.2 [klein] Base; re-queue with a new seed to train again."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLoRATrainer",
            display_name="Klein LoRA Trainer",
            category="Klein LoRA/Train",
            description=(
                "Trains a LoRA on FLUX.2 [klein] Base with flow matching. One training step = one optimizer update "
                "over grad-accum micro-batches; link training_steps from the Repeats Calculator so the dose "
                "(repeats per image) is what you planned. Captions and latents are encoded once and cached; the "
                "text encoder is freed before the transformer loads. Checkpoints, run.json and a health report go "
                "to output/klein_lora/<output_name>/; the final and best LoRA are copied to models/loras/klein/."
            ),
            inputs=_inputs(),
            outputs=[
                KleinLoraRun.Output(
                    "run",
                    tooltip="The trained run in memory (model, checkpoints, cached prompt "
                    "embeddings) for the Klein Base Preview Sampler: no second model load.",
                ),
                io.String.Output(
                    "lora_name", tooltip="The final LoRA as listed by LoraLoader (klein/<name>.safetensors)."
                ),
                io.String.Output("summary", tooltip="Dose, loss, health verdict and best checkpoint, in words."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, output_name=None) -> bool | str:
        if output_name is not None and (not output_name.strip() or any(c in output_name for c in '/\\:*?"<>|')):
            return f"output_name {output_name!r} must be a plain file name stem (no path separators)"
        return True

    @classmethod
    def execute(
        cls,
        dataset,
        training_steps: int,
        diffusers_model: str,
        diffusion_model: str,
        text_encoder: str,
        vae: str,
        batch_size: int,
        grad_accum: int,
        learning_rate: float,
        rank: int,
        save_every: int,
        seed: int,
        preview_prompts: str,
        output_name: str,
        gradient_checkpointing: bool,
        stop_on_collapse: bool,
        regularization_weight: float = PRESET.regularization_weight,
        regularization=None,
        held_out=None,
        continue_from: str = NONE,
        extra_repeats_per_image: float = PRESET.extension_repeats,
        empty_prompt_preservation: float = 0.0,
    ) -> io.NodeOutput:
        import comfy.model_management

        resolved = resolve_choice(diffusers_model, diffusion_model, text_encoder, vae)
        config = TrainConfig(
            output_name=output_name.strip(),
            training_steps=training_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            learning_rate=learning_rate,
            rank=rank,
            seed=seed,
            save_every=save_every,
            gradient_checkpointing=True if gradient_checkpointing else None,
            stop_on_collapse=stop_on_collapse,
            regularization_weight=regularization_weight,
            empty_prompt_preservation=empty_prompt_preservation,
        )
        run_dir = _runs_root() / config.output_name
        progress = _ComfyProgress(cls.hidden.unique_id, training_steps)
        prompts = tuple(p.strip() for p in preview_prompts.splitlines() if p.strip())
        comfy.model_management.unload_all_models()  # make room: ComfyUI's own models leave the GPU first
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs autograd
            run = train(
                resolved,
                dataset,
                config,
                run_dir,
                preview_prompts=prompts,
                regularization=regularization,
                held_out=held_out,
                cache_dir=default_cache_dir(),
                extend=_continuation(continue_from, extra_repeats_per_image),
                device=str(comfy.model_management.get_torch_device()),
                dist=DistributedContext(),  # one process, whatever the environment says
                callbacks=from_attributes(TrainCallbacks, progress),  # its methods are named like the callbacks
            )
        memory.register(run)  # its transformer and VAE leave the GPU when ComfyUI frees memory (nodes/memory.py)
        lora_name = _publish_to_loras(run)
        summary = _summary(run, lora_name)
        _send({"node": cls.hidden.unique_id, "kind": "done", "verdict": run.health.verdict if run.health else ""})
        return io.NodeOutput(run, lora_name, summary, ui=ui.PreviewText(summary))


def _publish_to_loras(run) -> str:
    """Copy the final (and best) LoRA into models/loras/klein/ so ComfyUI's LoRA loaders list them."""
    from ..klein_core.atomic import atomic_write

    target_dir = Path(folder_paths.get_folder_paths("loras")[0]) / LORA_SUBFOLDER
    files = [run.final_lora] + ([run.health.best_lora] if run.health and run.health.best_lora else [])
    for source in files:
        atomic_write(target_dir / source.name, lambda tmp, src=source: shutil.copyfile(src, tmp))
    return f"{LORA_SUBFOLDER}/{run.final_lora.name}"


def _summary(run, lora_name: str) -> str:
    plan = run.plan
    losses = run.history.losses
    lines = [
        f"{plan.training_steps} training steps, {plan.repeats_per_image:.1f} repeats per image ({plan.band})",
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no loss recorded",
    ]
    continued = continuation_summary(run.manifest)
    if continued:
        lines.insert(0, continued)
    if run.regularization:
        lines.append(run.regularization)
    lines.append(f"LoRA: {lora_name} (run folder {run.run_dir})")
    if run.health is not None:
        lines.append(run.health.verdict)
    return "\n".join(lines)
