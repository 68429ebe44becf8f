"""KleinRepeatsCalculator: turns a target dose (repeats per image) into training steps, inside ComfyUI.

The arithmetic lives in ``klein_core.train.planner`` (one source of truth with the CLI); this node only exposes it.
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..klein_core.preset import PRESET
from ..klein_core.train.estimate import VARIANTS, Mode, estimate
from ..klein_core.train.memory_mode import recommend_mode
from ..klein_core.train.gpu import detect_gpu_memory, detect_gpu_name
from ..klein_core.train.planner import plan

FORMULA = "repeats_per_image = S*B*G/N; S = ceil(N*R/(B*G))"
# The Klein 9B character guide's worked example (55 images -> 5500 training steps at G=1, 1375 at G=4); a starting
# value only, usually replaced by a link from the dataset node's image count.
EXAMPLE_IMAGE_COUNT = 55
MAX_IMAGES = 100_000
MAX_BATCH_SIZE = 64
MAX_GRAD_ACCUM = 1024
MAX_TARGET_REPEATS = 10_000.0
MAX_RESOLUTION = 4096


def _tooltip(what: str) -> str:
    return f"{what}\n{FORMULA}\n(N images, R target repeats, B batch size, G grad accum, S training steps)"


def _count_input(name: str, display_name: str, default: int, maximum: int, what: str) -> io.Int.Input:
    """One of the formula's whole-number inputs (N, B, G): at least 1, its tooltip ending in the formula."""
    return io.Int.Input(name, display_name=display_name, default=default, min=1, max=maximum, tooltip=_tooltip(what))


def repeats_input(name: str, display_name: str, default: float, what: str, optional: bool = False) -> io.Float.Input:
    """A dose R in repeats per image (the calculator's target, the trainer's extra dose): its tooltip ending in the
    formula."""
    return io.Float.Input(
        name,
        display_name=display_name,
        default=default,
        min=0.01,
        max=MAX_TARGET_REPEATS,
        step=1.0,
        optional=optional,
        tooltip=_tooltip(what),
    )


def _dose_inputs() -> list:
    """N, R, B and G: what the training steps are derived from."""
    return [
        _count_input(
            "images",
            "image count",
            EXAMPLE_IMAGE_COUNT,
            MAX_IMAGES,
            "N: number of training images (link the dataset's image count here).",
        ),
        repeats_input(
            "target_repeats",
            "target repeats",
            PRESET.target_repeats,
            f"R: how many times each image should be seen (dose); {PRESET.target_repeats:g} is the "
            "starter value for a high-likeness identity LoRA.",
        ),
        _count_input("batch_size", "batch size", PRESET.batch_size, MAX_BATCH_SIZE, "B: images per micro-batch."),
        _count_input(
            "grad_accum",
            "grad accum",
            PRESET.grad_accum,
            MAX_GRAD_ACCUM,
            "G: micro-batches accumulated per training step (saves memory; the training steps drop "
            "in proportion, the dose stays).",
        ),
    ]


def _estimate_inputs() -> list:
    """Optional: what the VRAM and time estimate in the summary needs beyond the dose."""
    return [
        io.Combo.Input(
            "variant",
            options=list(VARIANTS),
            default="9B",
            optional=True,
            tooltip="Klein Base size, for the VRAM and time estimate added to the summary (a prediction: "
            "weights + LoRA/AdamW + activations + cached data, checked against this GPU's memory).",
        ),
        io.Int.Input(
            "resolution",
            default=PRESET.resolution,
            min=256,
            max=MAX_RESOLUTION,
            step=16,
            optional=True,
            tooltip="Largest training resolution in px, for the VRAM and time estimate.",
        ),
    ]


class KleinRepeatsCalculator(io.ComfyNode):
    """Plans the dose of a LoRA run: how many training steps give each image R repeats."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinRepeatsCalculator",
            display_name="Klein Repeats Calculator",
            category="Klein LoRA/Plan",
            description=(
                "Plans a run by its dose, repeats per image, instead of raw steps. "
                f"{FORMULA}. Changing batch size or grad accum re-derives the training steps so the dose "
                "stays the same. Bands: below 50 under-trained, 50-90 normal identity, 90-120 high likeness, "
                "above 120 over-training risk."
            ),
            inputs=[*_dose_inputs(), *_estimate_inputs()],
            outputs=[
                io.Int.Output(
                    "training_steps",
                    display_name="training_steps",
                    tooltip="S: optimizer updates for the target dose, S = ceil(N*R/(B*G)). Feed the trainer.",
                ),
                io.String.Output(
                    "summary",
                    display_name="summary",
                    tooltip="The plan in words: images per training step, training steps, repeats per image, "
                    "band and epochs.",
                ),
            ],
            # An output node, so a plan-only graph runs and the summary is shown on the node.
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        images: int,
        target_repeats: float,
        batch_size: int,
        grad_accum: int,
        variant: str = "9B",
        resolution: int = PRESET.resolution,
    ) -> io.NodeOutput:
        # Linked values skip ComfyUI's min/max checks: the planner's PlanError names the bad value instead.
        run_plan = plan(images=images, target_repeats=target_repeats, batch_size=batch_size, grad_accum=grad_accum)
        summary = run_plan.summary() + "\n" + _estimate_text(run_plan, variant, resolution)
        return io.NodeOutput(run_plan.training_steps, summary, ui=ui.PreviewText(summary))


def _estimate_text(run_plan, variant: str, resolution: int) -> str:
    """The estimate line, plus the fit on this machine's GPU (and the mode that would fit) when there is one."""
    kwargs = dict(run_plan.estimate_kwargs(), device_name=detect_gpu_name())
    text = estimate(variant, resolution, PRESET.rank, Mode(), **kwargs).summary()
    gpu_memory = detect_gpu_memory()
    if gpu_memory is not None:
        advice = recommend_mode(variant, resolution, PRESET.rank, gpu_memory, **kwargs)
        text += f"\nwarning: {advice.warning}" if advice.warning else f"\nfits this GPU ({gpu_memory:.0f} GiB)"
    return text
