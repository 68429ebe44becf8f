"""``klein-lora fit-check``: every phase of a real run, at the released size, under torch's ``FakeTensorMode``.

No weights are read and no memory is allocated: the released transformer, VAE and text encoder are built on
``meta`` and materialised as fake tensors, and the pack's own functions run on them (``adapt_transformer``,
``make_optimizer``, ``accumulate_gradients``, ``validation_losses``, ``denoise_base``, ``LoraPatcher``,
``encode_images``, ``encode_prompts``). torch's ``MemTracker`` gives each phase's peak by category and
``FlopCounterMode`` its FLOPs (attention counted as the fused kernel computes it). Times are FLOPs at a stated MFU.

The phases, in the order a run meets them: the text encoder on one prompt and the VAE encode of one image (the
cache fill, before the transformer loads); a training step (forward, backward, AdamW update, with the moments
already allocated as from training step 2 on); one image of the checkpoint's validation pass; one sample step of
the health preview (the CFG pair, LoRA live); then, after training, one sample step of the preview grid with a LoRA
merged (and its restore), and the VAE decode of one preview. A phase fits when its peak stays within
:func:`usable_gib` of the card.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..facts import KLEIN_SHAPES, LATENT_CHANNELS, PIXEL_MULTIPLE, TEXT_TOKENS, KleinShape
from ..fields import from_attributes
from ..model import lora as lora_io
from ..model.latents import decode_latents, encode_images
from ..model.loading import (
    read_shapes,
    text_encoder_layers_needed,
    variant_from_bfl_shapes,
)
from ..model.text import encode_prompts
from ..errors import PlanError
from ..preset import PRESET
from ..preview.sampling import denoise_base
from ..train.config import TrainConfig
from ..train.estimate import (
    ASSUMED_MFU,
    CONTEXT_GIB,
    REFERENCE_DEVICE,
    Mode,
    choose_health_preview_every,
    ordinal,
    peak_tflops,
    usable_gib,
)
from ..train.memory_mode import decide_memory_mode
from ..train.planner import training_steps_for
from ..train.objective import MicroBatch, accumulate_gradients, validation_losses, validation_subset
from ..train.session import adapt_transformer, health_preview_size, make_optimizer, optimizer_step
from .fake_model import (
    OFF_DEVICE,
    LoraMemTracker,
    fake_tensors,
    adapt_fake,
    materialise,
    meta_text_encoder,
    meta_transformer,
    meta_vae,
    peak_by_category,
)
from .traffic import LoraOverhead, lora_overhead

BF16 = torch.bfloat16


@dataclass(frozen=True)
class FitCheckRequest:
    """The run to audit, in the trainer's own settings (defaults: the starter preset, a 24 GiB card)."""

    variant: str = "9B"
    resolution: int = PRESET.resolution
    gpu_memory_gib: float = 24.0
    rank: int = PRESET.rank
    batch_size: int = PRESET.batch_size
    grad_accum: int = PRESET.grad_accum
    base_8bit: bool = False
    gradient_checkpointing: bool | None = None  # None: automatic, decided as the trainer decides it
    images: int = 20
    save_every: int = PRESET.save_every
    mfu: float = ASSUMED_MFU

    def __post_init__(self) -> None:
        """Refuse a bad value by name before the audit's minutes (the shape is read here too)."""
        object.__setattr__(self, "variant", released_shape(self.variant).name)  # a model path read once, here
        for name in ("gpu_memory_gib", "mfu"):
            if not getattr(self, name) > 0:
                raise PlanError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("resolution", "rank", "batch_size", "grad_accum", "images", "save_every"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.resolution % PIXEL_MULTIPLE:
            raise PlanError(f"resolution {self.resolution} is not a multiple of {PIXEL_MULTIPLE}")

    @property
    def shape(self) -> KleinShape:
        return KLEIN_SHAPES[self.variant]

    def train_config(self, mode: Mode) -> TrainConfig:
        """The trainer's config of this run: the request's settings of the same names, in the decided mode."""
        return from_attributes(
            TrainConfig,
            self,
            gradient_checkpointing=mode.gradient_checkpointing,
            checkpointed_blocks=mode.checkpointed_blocks,
        )


@dataclass
class Phase:
    """One phase: its peak device memory (GiB) with the categories at that peak, its FLOPs, and the verdict."""

    name: str
    peak_gib: float
    categories: dict[str, float]
    flops: float
    fits: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitReport:
    """The audit of one run: every phase, the verdict, and the checkpoint work against the training work."""

    request: FitCheckRequest
    mode: Mode  # the memory mode the trainer would choose (or the one asked for)
    phases: list[Phase] = field(default_factory=list)
    training_step_flops: float = 0.0
    checkpoint_flops: float = 0.0  # the validation pass + the health preview, averaged over checkpoints
    health_preview_every: int = 1  # as the trainer chooses it: a preview at every K-th checkpoint
    lora_overhead: LoraOverhead | None = None  # the training step's traffic and saved activations against the frozen

    @property
    def fits(self) -> bool:
        return all(phase.fits for phase in self.phases)

    @property
    def peak_gib(self) -> float:
        return max(phase.peak_gib for phase in self.phases)

    @property
    def checkpoint_work_fraction(self) -> float:
        """One checkpoint's health work / the training work between two checkpoints (``save_every`` steps)."""
        return self.checkpoint_flops / (self.training_step_flops * max(1, self.request.save_every))

    def on_card(self, gpu_memory_gib: float) -> "FitReport":
        """The same run judged against another card (the memory mode stays what was audited)."""
        judged = replace(
            self,
            request=replace(self.request, gpu_memory_gib=gpu_memory_gib),
            phases=[replace(phase) for phase in self.phases],
        )
        judged.judge()
        return judged

    def judge(self) -> None:
        limit = usable_gib(self.request.gpu_memory_gib)
        for phase in self.phases:
            phase.fits = phase.peak_gib <= limit

    def seconds(self, flops: float) -> float:
        """Time on the reference card at the request's MFU (a prediction, not a measurement)."""
        _name, tflops = peak_tflops(REFERENCE_DEVICE)
        return flops / (tflops * 1e12 * self.request.mfu)

    def as_dict(self) -> dict:
        request = self.request
        return {
            "variant": request.variant,
            "resolution": request.resolution,
            "rank": request.rank,
            "batch_size": request.batch_size,
            "base_8bit": request.base_8bit,
            "gradient_checkpointing": self.mode.gradient_checkpointing,
            "mode": self.mode.label,
            "checkpointed_blocks": self.mode.checkpointed(request.shape.num_layers + request.shape.num_single_layers),
            "gpu_memory_gib": request.gpu_memory_gib,
            "usable_gib": usable_gib(request.gpu_memory_gib),
            "fits": self.fits,
            "peak_gib": self.peak_gib,
            "phases": [phase.as_dict() for phase in self.phases],
            "training_step_tflop": self.training_step_flops / 1e12,
            "checkpoint_tflop": self.checkpoint_flops / 1e12,
            "checkpoint_work_fraction": self.checkpoint_work_fraction,
            "health_preview_every": self.health_preview_every,
            "training_step_s": self.seconds(self.training_step_flops),
            "checkpoint_s": self.seconds(self.checkpoint_flops),
            "time_basis": f"{REFERENCE_DEVICE} bf16 at {request.mfu:.0%} MFU",
            "lora_overhead": self.lora_overhead.as_dict() if self.lora_overhead else None,
        }


def released_shape(variant: str) -> KleinShape:
    """``9B``/``4B``, or a Klein model folder or diffusion-model file: its size is read from config or tensor headers
    (no weights); the audit knows the released sizes only."""
    if variant.upper() in KLEIN_SHAPES:
        return KLEIN_SHAPES[variant.upper()]
    path = Path(variant)
    if path.is_dir() and (path / "transformer" / "config.json").exists():
        config = json.loads((path / "transformer" / "config.json").read_text())
        hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    elif path.is_file():
        hidden = variant_from_bfl_shapes(read_shapes(path), path)[0].hidden_size
    else:
        raise PlanError(f"--variant {variant!r} is neither 9B, 4B, a Klein diffusers folder nor a model file")
    known = [shape for shape in KLEIN_SHAPES.values() if shape.hidden_size == hidden]
    if not known:
        raise PlanError(
            f"{path} is a Klein transformer of hidden size {hidden}, not a released size (9B: 4096, "
            "4B: 3072); fit-check audits the released sizes"
        )
    return known[0]


def decide_mode(request: FitCheckRequest) -> Mode:
    """The memory mode as the trainer decides it for this card (automatic unless the request says)."""
    return decide_memory_mode(
        request.shape.transformer_config,
        request.resolution,
        request.rank,
        request.gradient_checkpointing,
        request.base_8bit,
        gpu_memory_gib=request.gpu_memory_gib,
        batch_size=request.batch_size,
        grad_accum=request.grad_accum,
        images=request.images,
    ).mode


def _cpu_flash_attention(query, key, value, *_args, **_kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward(grad_out, query, key, value, *_args, **_kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The stand-in device runs the CPU's fused attention kernel, which FlopCounterMode has no formula for: the same
# FLOPs as CUDA's flash attention, so its formulas (on the tensors' shapes) apply.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward,
}


class _Meter:
    """Runs each phase under a fresh ``LoraMemTracker`` and ``FlopCounterMode`` and keeps its figures.

    FLOPs of a phase with a backward are counted in a second pass: the counter's module hooks hold every module's
    output until the backward, which would undo gradient checkpointing in the memory count."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []

    def run(self, name: str, body, resident: list, has_backward: bool = False) -> Phase:
        tracker, counter = LoraMemTracker(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
        tracker.track_external(*resident)
        if has_backward:
            with tracker:
                body()
            with counter:
                body()
        else:
            with tracker, counter:
                body()
        peak, categories = peak_by_category(tracker)
        phase = Phase(name, peak, categories, float(counter.get_total_flops()))
        self.phases.append(phase)
        return phase


class _FakeTokenizer:
    """Stands in for the Qwen tokenizer (no vocabulary files offline): 512 padded token ids, as the real one gives."""

    def __call__(self, texts, max_length: int = TEXT_TOKENS, **_kwargs) -> dict:
        shape = (len(texts), max_length)
        return {
            "input_ids": torch.zeros(shape, dtype=torch.long),
            "attention_mask": torch.ones(shape, dtype=torch.long),
        }


def fit_check(request: FitCheckRequest) -> FitReport:
    """Audit every phase of the run ``request`` describes (minutes on two CPU cores for the 9B)."""
    mode = decide_mode(request)
    report, meter = FitReport(request, mode), _Meter()
    # Built on meta before the fake mode starts (a dtype change inside it would swap fake tensors into meta modules).
    text_encoder = meta_text_encoder(request.shape, text_encoder_layers_needed())
    vae, transformer = meta_vae(), meta_transformer(request.shape)
    frozen = meta_transformer(request.shape)  # the LoRA's traffic is compared with this frozen copy's
    with fake_tensors():
        embeds = _cache_phases(request, materialise(text_encoder), materialise(vae), meter)
        _training_phases(request, mode, materialise(transformer), vae, embeds, meter, report, frozen)
    report.phases = meter.phases
    report.judge()
    return report


def _cache_phases(request: FitCheckRequest, text_encoder, vae, meter: _Meter) -> list[torch.Tensor]:
    """The text encoder on one prompt, then the VAE encode of one image; returns the cached embeddings (one per
    caption, plus the dropped caption and "", as the trainer keeps them on the device)."""
    meter.run(
        "text encoder (one prompt)",
        lambda: encode_prompts(text_encoder, _FakeTokenizer(), ["photo of kleinchar"]),
        [text_encoder],
    )
    width = request.shape.joint_attention_dim
    embeds = [torch.empty(TEXT_TOKENS, width, dtype=BF16) for _ in range(request.images + 2)]
    pixels = torch.empty(1, 3, request.resolution, request.resolution)
    meter.run("VAE encode (one image)", lambda: encode_images(vae, pixels), [vae, *embeds])
    return embeds


def _training_phases(
    request: FitCheckRequest,
    mode: Mode,
    transformer,
    vae,
    embeds: list[torch.Tensor],
    meter: _Meter,
    report: FitReport,
    frozen: torch.nn.Module,
) -> None:
    """A training step, one image of the validation pass and one sample step of the health preview, each with
    what training keeps on the device: weights, LoRA, AdamW moments, the cached dataset and the VAE; and the
    training step's traffic against the ``frozen`` (meta) copy of the base."""
    config = request.train_config(mode)
    if request.base_8bit:
        from ..model.lowvram import quantize_base_8bit

        quantize_base_8bit(transformer)
    adapt_fake(transformer, lambda model: adapt_transformer(model, config))
    params = lora_io.lora_parameters(transformer)
    optimizer, scheduler = make_optimizer(params, config, "cuda")
    _allocate_moments(params, optimizer, scheduler)
    latent_side = request.resolution // PIXEL_MULTIPLE
    latents = [torch.empty(LATENT_CHANNELS, latent_side, latent_side) for _ in range(request.images)]
    resident = [transformer, optimizer, vae, *embeds, *latents]
    transformer.train()  # as the training loop sets it

    def training_step() -> None:
        micro_batches = [_micro_batch(latents, embeds, request.batch_size) for _ in range(request.grad_accum)]
        accumulate_gradients(transformer, micro_batches)
        optimizer_step(optimizer, scheduler)

    report.training_step_flops = meter.run("training step", training_step, resident, has_backward=True).flops
    step_batch = _micro_batch(latents, embeds, request.batch_size)
    report.lora_overhead = lora_overhead(frozen, transformer, config, step_batch.latents, step_batch.embeds)
    validated = len(validation_subset(request.images, config.validation_images))
    captions = [embed.unsqueeze(0) for embed in embeds]
    validation = meter.run(
        "validation pass (one image of it)", lambda: validation_losses(transformer, latents, captions, [0]), resident
    )
    size = health_preview_size(request.resolution, config)
    health = meter.run(
        "health preview (one CFG sample step)",
        lambda: denoise_base(transformer, embeds[0], embeds[-1], size, size, sample_steps=1),
        resident,
    )
    preview_flops = health.flops * config.health_sample_steps
    report.health_preview_every = choose_health_preview_every(
        validation.flops * validated,
        preview_flops,
        report.training_step_flops * request.save_every,
        _checkpoints(request),
    )
    report.checkpoint_flops = validation.flops * validated + preview_flops / report.health_preview_every
    lora_io.remove_lora(transformer)  # what the trainer hands the preview: the plain base
    _preview_phases(request, transformer, vae, embeds, meter)


def _checkpoints(request: FitCheckRequest) -> int:
    """The checkpoints of the planned run: the starter dose of repeats per image over ``save_every``."""
    steps = training_steps_for(request.images, PRESET.target_repeats, request.batch_size, request.grad_accum)
    return steps // request.save_every


def _allocate_moments(params: list[torch.Tensor], optimizer, scheduler) -> None:
    """One update on zero gradients, so AdamW's moments exist as they do from training step 2 on."""
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer_step(optimizer, scheduler)


def _micro_batch(latents: list[torch.Tensor], embeds: list[torch.Tensor], batch_size: int) -> MicroBatch:
    stacked = torch.stack(latents[:batch_size])
    return MicroBatch(stacked, torch.stack(embeds[:batch_size]), torch.empty_like(stacked), torch.empty(batch_size))


def _preview_phases(request: FitCheckRequest, transformer, vae, embeds: list[torch.Tensor], meter: _Meter) -> None:
    """After training: one sample step of the preview grid with a checkpoint merged (then restored), and the VAE
    decode of one preview. The optimizer and the cached latents are gone; the preview prompt embeddings stay."""
    targets = set(lora_io.target_module_names(transformer))
    weights = {
        name: (
            torch.empty(request.rank, module.in_features, device=OFF_DEVICE),
            torch.empty(module.out_features, request.rank, device=OFF_DEVICE),
        )
        for name, module in transformer.named_modules()
        if name in targets
    }
    prompt, negative = embeds[0], embeds[-1]
    patcher = lora_io.LoraPatcher(transformer, backup_device=OFF_DEVICE)
    size = request.resolution

    def merged_step() -> None:
        with patcher.applied(weights):
            denoise_base(transformer, prompt, negative, size, size, sample_steps=1)

    meter.run("preview grid (one sample step, LoRA merged)", merged_step, [transformer, vae, prompt, negative])
    latents = torch.empty(1, LATENT_CHANNELS, size // PIXEL_MULTIPLE, size // PIXEL_MULTIPLE)
    meter.run("preview decode (VAE, one image)", lambda: decode_latents(vae, latents), [transformer, vae])


def _previews(every: int) -> str:
    return f" (health previews at every {ordinal(every)} checkpoint: they would cost more)" if every > 1 else ""


def render_table(report: FitReport) -> str:
    """The audit for people: one row per phase, the verdict, and the time of a training step and a checkpoint."""
    request, limit = report.request, usable_gib(report.request.gpu_memory_gib)
    mode = report.mode.label
    lines = [
        f"fit-check: Klein Base {request.variant} at {request.resolution} px, batch {request.batch_size}, "
        f"rank {request.rank}, {mode}, on a {request.gpu_memory_gib:g} GiB card "
        f"(a phase may peak at {limit:.1f} GiB: 5% allocator slack and {CONTEXT_GIB:g} GiB CUDA context)",
        f"  {'phase':46s} {'peak GiB':>8s}  {'fits':4s}  largest parts",
    ]
    for phase in report.phases:
        parts = sorted(((v, k) for k, v in phase.categories.items() if v >= 0.05), reverse=True)[:3]
        described = ", ".join(f"{k} {v:.1f}" for v, k in parts)
        lines.append(f"  {phase.name:46s} {phase.peak_gib:8.2f}  {'yes' if phase.fits else 'NO':4s}  {described}")
    figures = report.as_dict()
    lines.append(
        f"  training step {figures['training_step_tflop']:.0f} TFLOP ({figures['training_step_s']:.2f} s), "
        f"checkpoint health work {figures['checkpoint_tflop']:.0f} TFLOP ({figures['checkpoint_s']:.0f} s) "
        f"= {report.checkpoint_work_fraction:.0%} of the {request.save_every} training steps between "
        f"checkpoints{_previews(report.health_preview_every)}; times on {figures['time_basis']} (predictions)"
    )
    if report.lora_overhead is not None:
        overhead = report.lora_overhead.as_dict()
        lines.append(
            "  the LoRA over the frozen model per training step: "
            f"element-wise traffic {overhead['traffic_ratio']:.2f}x "
            f"({overhead['lora_elementwise_gb']:.0f} vs {overhead['frozen_elementwise_gb']:.0f} GB), saved activations "
            f"{overhead['saved_activations_ratio']:.2f}x ({overhead['lora_saved_activations_gib']:.1f} vs "
            f"{overhead['frozen_saved_activations_gib']:.1f} GiB)"
        )
    failing = [phase.name for phase in report.phases if not phase.fits]
    lines.append(
        "verdict: fits in every phase"
        if not failing
        else f"verdict: does NOT fit: {', '.join(failing)} peak above {limit:.1f} GiB"
    )
    return "\n".join(lines)
