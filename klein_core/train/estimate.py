"""VRAM and time estimate of a Klein LoRA run, before anything loads: "does it fit my card, how long will it take?"

Pure arithmetic on the model's shape (no torch needed; ``train.gpu`` says which card is there). Batch 1 unless given.

**Compute** (T = image tokens + 512 text tokens, d = hidden size, n = double + single blocks). Every token passes
every block through 13·d² weights (double block: q, k, v, out = 4d² plus the SwiGLU feed-forward d→6d, 3d→d = 9d²,
per stream; single block: the fused qkv+mlp-in d→9d plus the output 4d→d), so N_eff = n·13·d² (6.98 B for 9B,
3.07 B for 4B), plus the small embedders and output projection. One forward:

    linear    L = 2·N_eff·T  (+ embedders, proj_out)          attention  A = 4·T²·d·n  (QKᵀ and PV)
    forward   F = L + A

A LoRA training step on a frozen base computes no weight gradients for the base, only input gradients (one more
matmul per Linear, = L) and the fused-attention backward (2.5·A: dQ, dK, dV, dP and the recomputed scores):

    training step, no gradient checkpointing (GC)  = 2·L + 3.5·A     ≈ 2.2 × forward at 1024 px
    training step, per-block GC (one more forward) = 3·L + 4.5·A     ≈ 3.2 × forward
    + LoRA: 3 × its forward (forward, input grad, weight grad); + one LoRA forward more with GC.

9B at 1024² gives 75.5 TFLOP forward, 167.6 / 243.1 TFLOP per training step (the published Klein 9B compute
figures), 0.8 TFLOP more for the rank-16 LoRA. A preview of S sample steps at CFG > 1 is 2·S forwards (batched CFG:
one forward of batch 2; same FLOPs).

**Time** = FLOPs / (peak × MFU). ``PEAK_TFLOPS`` holds dense-bf16 tensor rates; ``ASSUMED_MFU`` (0.5) is an
assumption: comparable DiT trainers reach 42-65 % of peak. Until ``bench/gpu_klein.py`` has measured a card, every
time here is a prediction, not a measurement; its measured MFU is the number to put in ``mfu=``. The 8-bit base uses
the same FLOPs (weight-only int8 dequantises per layer), so its time here is optimistic.

**Memory** (GiB = 2^30 bytes), the sum of:

* weights: exact parameter count × 2 bytes (bf16); with the 8-bit base the block Linear weights take 1 byte (+ one
  bf16 scale per output row) and one dequantised bf16 copy of the largest Linear is alive during its matmul;
* LoRA + AdamW: LoRA parameters × 16 bytes (fp32 weight, gradient and two Adam moments);
* activations, calibrated to the fit-check audit's count of the pack's own LoRA training step (9B, 1024 px, no
  GC: 24.2 GiB kept and transient): without GC ``ACTIVATION_BYTES × T × d × n`` (≈ 21.5 bf16 values per token per
  hidden unit per block; 9B: 8.1 / 14.8 / 24.2 GiB at 512 / 768 / 1024 px; published figures for peft's plain fp32
  LoRA are a third higher); with per-block GC only each block's inputs are kept (3.2 bytes × T × d per block: the
  streams, modulation and rope, as the audit counts them) plus one block's full activations while it is recomputed
  (9B: 0.9 / 1.6 / 2.6 GiB in all with every block checkpointed). Fused attention (SDPA flash / memory-efficient)
  is assumed: the math kernel would add the T² score matrices (~162 GiB at 1024 for 9B);
* the cached dataset on the device: latents (fp32) for every image at every resolution, and one (512, joint dim)
  bf16 embedding per distinct caption (the trainer moves them to the device once);
* the VAE (84 M parameters, 0.31 GiB fp32), which stays on the device for the health previews;
* ``CONTEXT_GIB`` (1 GiB): CUDA context and cuBLAS workspace.

A run fits when every phase stays within ``usable_gib``: 95% of the card (the caching allocator's fragmentation
needs the rest) less the context. Besides the training step, the text encoder's phase counts: the trainer runs it
first, caches the embeddings and frees it before the transformer loads (the loader keeps its layers up to the
deepest one Klein reads). These figures agree with ``klein-lora fit-check`` (the fake-tensor audit of the real code,
``tools/fitcheck.py``) within 10%; ``tests/test_fitcheck.py`` holds them to it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from ..errors import PlanError
from .. import facts
from ..facts import PIXEL_MULTIPLE as PATCH_PIXELS
from ..facts import TEXT_TOKENS
from ..preset import PRESET

GIB = 2**30
# Bytes per token per hidden unit per block: without GC, and what a checkpointed block keeps (its inputs, modulation
# and rope); both the fit-check audit's count.
ACTIVATION_BYTES = 43.0
CHECKPOINT_BYTES = 3.2
CONTEXT_GIB = 1.0
USABLE_FRACTION = 0.95  # of the card: the caching allocator's fragmentation needs the rest
VAE_GIB = 84.05e6 * 4 / 2**30  # FLUX.2's VAE in fp32, resident through training for the health previews
TEXT_ENCODER_ACTIVATIONS_GIB = 0.3  # one 512-token prompt through Qwen3 (the fit-check audit counts 0.23-0.28)
LORA_OPTIMIZER_BYTES = 16  # fp32 weight + fp32 grad + 2 fp32 AdamW moments
ATTENTION_BACKWARD_FACTOR = 2.5  # flash-attention backward / forward matmul FLOPs
ASSUMED_MFU = 0.5
REFERENCE_DEVICE = "H100"  # whose time is shown when no GPU is detected

# Dense bf16 tensor TFLOP/s (fp32 accumulate). H100/H200: 790, what a large bf16 matmul sustains (769-798 TFLOP/s
# measured on H100/H200 cards; the SXM datasheet says 989 at boost
# clock). Others: vendor datasheets. Longer names first: the first substring found in the device name wins.
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H200": 790.0,
    "H100": 790.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 5090": 209.5,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Flux2/Klein transformer that cost compute and memory."""

    name: str
    hidden_size: int
    num_layers: int  # double-stream blocks
    num_single_layers: int
    joint_attention_dim: int
    in_channels: int = 128
    mlp_ratio: float = 3.0
    head_dim: int = 128
    timestep_channels: int = 256

    @classmethod
    def from_config(cls, config: dict, name: str = "custom") -> "ModelShape":
        """From a ``Flux2Transformer2DModel`` config dict (e.g. ``TINY_TRANSFORMER_CONFIG``)."""
        return cls(
            name=name,
            hidden_size=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
            num_layers=int(config["num_layers"]),
            num_single_layers=int(config["num_single_layers"]),
            joint_attention_dim=int(config["joint_attention_dim"]),
            in_channels=int(config.get("in_channels", 128)),
            mlp_ratio=float(config.get("mlp_ratio", 3.0)),
            head_dim=int(config["attention_head_dim"]),
            timestep_channels=int(config.get("timestep_guidance_channels", 256)),
        )

    @property
    def blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def per_token_block_params(self) -> int:
        """Weights one token passes through in one block (either kind): 4d² attention + 3·mlp·d feed-forward."""
        d = self.hidden_size
        return 4 * d * d + 3 * self.mlp_hidden * d

    @property
    def effective_params(self) -> int:
        """N_eff: the weights every token passes through in the blocks (6.98 B for 9B)."""
        return self.blocks * self.per_token_block_params

    @property
    def block_linear_params(self) -> int:
        """All Linear weights inside the blocks (double blocks have two streams): what an 8-bit base quantises."""
        return (2 * self.num_layers + self.num_single_layers) * self.per_token_block_params

    @property
    def params(self) -> int:
        """Exact parameter count of ``Flux2Transformer2DModel`` with this shape (9B: 9.079 B)."""
        d = self.hidden_size
        norms = (4 * self.num_layers + 2 * self.num_single_layers) * self.head_dim  # q/k RMSNorm weights
        modulation = (6 + 6 + 3) * d * d  # double img, double txt, single
        time_embedding = self.timestep_channels * d + d * d
        embedders = self.in_channels * d + self.joint_attention_dim * d
        output = 2 * d * d + d * self.in_channels  # norm_out (scale, shift) and proj_out
        return self.block_linear_params + norms + modulation + time_embedding + embedders + output

    @property
    def largest_linear_params(self) -> int:
        d = self.hidden_size
        return max(d * (3 * d + 2 * self.mlp_hidden), (d + self.mlp_hidden) * d, 2 * self.mlp_hidden * d)

    def lora_params(self, rank: int) -> int:
        """LoRA parameters on the trainer's targets (``lora.LORA_TARGETS``): every attention projection of both
        double-block streams, the single blocks' fused qkv+mlp-in and their output projection."""
        d, m = self.hidden_size, self.mlp_hidden
        double = 8 * (d + d) * rank
        single = ((d + 3 * d + 2 * m) + (d + m + d)) * rank
        return self.num_layers * double + self.num_single_layers * single

    def lora_params_per_token(self, rank: int) -> int:
        """LoRA weights one token passes through: one stream's 4 projections per double block, all of a single block."""
        d, m = self.hidden_size, self.mlp_hidden
        single = ((d + 3 * d + 2 * m) + (d + m + d)) * rank
        return self.num_layers * 4 * (d + d) * rank + self.num_single_layers * single

    @property
    def block_linear_rows(self) -> int:
        """Output rows of the block Linears (an 8-bit base keeps one bf16 scale per row)."""
        d, m = self.hidden_size, self.mlp_hidden
        return self.num_layers * 2 * (5 * d + 2 * m) + self.num_single_layers * (4 * d + 2 * m)


def _shape_of(facts) -> "ModelShape":
    return ModelShape(
        facts.name, facts.hidden_size, facts.num_layers, facts.num_single_layers, facts.joint_attention_dim
    )


KLEIN_9B = _shape_of(facts.KLEIN_9B)
KLEIN_4B = _shape_of(facts.KLEIN_4B)
VARIANTS: dict[str, ModelShape] = {"9B": KLEIN_9B, "4B": KLEIN_4B}


def model_shape(variant: "str | ModelShape | dict") -> ModelShape:
    """``"9B"``/``"4B"`` (any case), a :class:`ModelShape`, or a transformer config dict."""
    if isinstance(variant, ModelShape):
        return variant
    if isinstance(variant, dict):
        shape = ModelShape.from_config(variant)
        known = [name for name, v in VARIANTS.items() if replace(v, name=shape.name) == shape]
        return replace(shape, name=known[0]) if known else shape
    key = str(variant).strip().upper()
    if key not in VARIANTS:
        raise PlanError(f"unknown Klein variant {variant!r}: use one of {', '.join(VARIANTS)} (or pass a config)")
    return VARIANTS[key]


@dataclass(frozen=True)
class Mode:
    """How the base is held and trained: the memory/speed trade-offs the trainer offers."""

    gradient_checkpointing: bool = False
    base_8bit: bool = False
    checkpointed_blocks: int | None = None  # checkpoint K blocks, single-stream first (None: all)

    @property
    def label(self) -> str:
        parts = ["8-bit base" if self.base_8bit else "bf16 base"]
        if self.gradient_checkpointing:
            blocks = f" of {self.checkpointed_blocks} blocks" if self.checkpointed_blocks is not None else ""
            parts.append(f"gradient checkpointing{blocks}")
        return " + ".join(parts)

    def checkpointed(self, blocks: int) -> int:
        """How many of a model's ``blocks`` this mode checkpoints."""
        if not self.gradient_checkpointing:
            return 0
        return blocks if self.checkpointed_blocks is None else min(blocks, self.checkpointed_blocks)

    @property
    def flags(self) -> str:
        """The ``klein-lora train`` options that select this mode ("" for the default)."""
        return " ".join(
            f
            for f, on in (("--gradient-checkpointing", self.gradient_checkpointing), ("--base-8bit", self.base_8bit))
            if on
        )


# Fastest first. Gradient checkpointing is exact (same numbers, ~1.45x compute); the 8-bit base changes the weights
# slightly, so it comes after it, and only with checkpointing (without, the backward keeps a bf16 copy of every int8
# weight: see ``config.BASE_8BIT_NEEDS_CHECKPOINTING``).
MODES_BY_PREFERENCE = (Mode(), Mode(gradient_checkpointing=True), Mode(True, True))


def image_tokens(resolution: int) -> int:
    """Latent tokens of a resolution² image (aspect buckets keep about the same area)."""
    return facts.image_tokens(int(resolution), int(resolution))


@dataclass(frozen=True)
class Flops:
    """FLOPs of one micro-batch (batch ``batch_size``) at one resolution."""

    linear: float  # 2 * N_eff * T (+ embedders/proj_out) * B
    attention: float  # 4 * T^2 * d * n * B
    lora_forward: float

    @property
    def forward(self) -> float:
        """Inference forward of the base (a merged LoRA costs nothing extra)."""
        return self.linear + self.attention

    def training_step(self, recomputed: float = 0.0) -> float:
        """Forward, input gradients and LoRA gradients; ``recomputed``: the share of blocks checkpointing runs twice."""
        base = 2 * self.linear + (1 + ATTENTION_BACKWARD_FACTOR) * self.attention
        lora = 3 * self.lora_forward
        return base + lora + recomputed * (self.forward + self.lora_forward)


def flops(variant: "str | ModelShape | dict", resolution: int, rank: int = PRESET.rank, batch_size: int = 1) -> Flops:
    shape = model_shape(variant)
    d, n = shape.hidden_size, shape.blocks
    img = image_tokens(resolution)
    tokens = img + TEXT_TOKENS
    edges = (
        img * (shape.in_channels * d * 2) + TEXT_TOKENS * shape.joint_attention_dim * d
    )  # x_embedder, proj_out, context
    linear = 2.0 * (shape.effective_params * tokens + edges) * batch_size
    attention = 4.0 * tokens * tokens * d * n * batch_size
    lora = 2.0 * shape.lora_params_per_token(rank) * tokens * batch_size
    return Flops(linear, attention, lora)


@dataclass(frozen=True)
class Memory:
    """Peak device memory of a training step, in GiB, by what holds it."""

    weights: float
    lora_optimizer: float
    activations: float
    dataset: float
    vae: float = VAE_GIB  # kept on the device for the health previews
    context: float = CONTEXT_GIB
    text_encoder: float = 0.0  # the cache fill's phase, before the transformer loads (not part of the total)

    @property
    def total(self) -> float:
        return self.weights + self.lora_optimizer + self.activations + self.dataset + self.vae + self.context

    @property
    def peak(self) -> float:
        """The largest phase the estimate covers: the training step, or the text encoder's cache fill."""
        return max(self.total, self.text_encoder + self.context)


def text_encoder_gib(shape: ModelShape) -> float:
    """The text encoder's phase: its bf16 weights up to the deepest layer Klein reads (the loader drops the rest),
    plus one prompt's activations. Zero for a shape that is not a released Klein (its encoder is unknown)."""
    known = [s for s in facts.KLEIN_SHAPES.values() if s.joint_attention_dim == shape.joint_attention_dim]
    if not known:
        return 0.0
    qwen = facts.QWEN3_CONFIGS[known[0].text_encoder]
    h, kv = qwen["hidden_size"], qwen["num_key_value_heads"] * qwen["head_dim"]
    heads = qwen["num_attention_heads"] * qwen["head_dim"]
    layer = h * heads * 2 + h * kv * 2 + 3 * h * qwen["intermediate_size"]
    embeddings = qwen["vocab_size"] * h * (1 if qwen["tie_word_embeddings"] else 2)
    layers = max(facts.TEXT_ENCODER_LAYERS) + 1
    return (embeddings + layers * layer) * 2 / GIB + TEXT_ENCODER_ACTIVATIONS_GIB


def memory(
    variant: "str | ModelShape | dict",
    resolution: int,
    rank: int = PRESET.rank,
    mode: Mode = Mode(),
    batch_size: int = 1,
    images: int = 1,
    resolutions: int = 1,
) -> Memory:
    shape = model_shape(variant)
    d, n = shape.hidden_size, shape.blocks
    if mode.base_8bit:
        quantised = shape.block_linear_params * 1 + shape.block_linear_rows * 2
        weights = quantised + (shape.params - shape.block_linear_params) * 2 + shape.largest_linear_params * 2
    else:
        weights = shape.params * 2
    tokens = (image_tokens(resolution) + TEXT_TOKENS) * batch_size
    checkpointed = mode.checkpointed(n)  # each keeps its bf16 input; one at a time is recomputed in full
    activations = (CHECKPOINT_BYTES * checkpointed + ACTIVATION_BYTES * (n - checkpointed)) * tokens * d
    if checkpointed:
        activations += ACTIVATION_BYTES * tokens * d
    latents = images * resolutions * 128 * image_tokens(resolution) * 4
    embeds = (images + 2) * TEXT_TOKENS * shape.joint_attention_dim * 2  # captions + dropped caption + ""
    return Memory(
        weights=weights / GIB,
        lora_optimizer=shape.lora_params(rank) * LORA_OPTIMIZER_BYTES / GIB,
        activations=activations / GIB,
        dataset=(latents + embeds) / GIB,
        text_encoder=text_encoder_gib(shape),
    )


def peak_tflops(device_name: str | None) -> tuple[str, float] | None:
    """(table key, dense bf16 TFLOP/s) for a device name such as ``"NVIDIA H100 80GB HBM3"``, or None if unknown."""
    if not device_name:
        return None
    lowered = device_name.lower()
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in lowered:
            return key, value
    return None


@dataclass(frozen=True)
class CheckpointWork:
    """One checkpoint's health work: the validation pass on at most ``validation_images`` training images (each at
    the fixed σ) and a health preview at most ``health_preview_resolution`` a side (50 sample steps, CFG pair) at
    every ``health_preview_every``-th checkpoint; ``fraction``: its average share of the training between two."""

    validation_tflop: float
    preview_tflop: float
    health_preview_every: int
    fraction: float

    @property
    def tflop(self) -> float:
        return self.validation_tflop + self.preview_tflop / self.health_preview_every


def choose_health_preview_every(
    validation: float, preview: float, training_between: float, checkpoints: int | None
) -> int:
    """1 (a preview at every checkpoint) unless that pushes the checkpoint work above
    ``PRESET.max_checkpoint_work_fraction`` of the training between checkpoints; then the smallest K that keeps it
    under, but never so large that a run previews fewer than ``PRESET.min_health_previews`` checkpoints."""
    room = PRESET.max_checkpoint_work_fraction * training_between - validation
    needed = 1 if room >= preview else (math.ceil(preview / room) if room > 0 else math.inf)
    most = max(1, checkpoints // PRESET.min_health_previews) if checkpoints else math.inf
    wanted = min(needed, most)
    return int(wanted) if math.isfinite(wanted) else 1


@dataclass(frozen=True)
class CheckpointSettings:
    """What a run does at each checkpoint (the trainer's defaults; ``TrainConfig`` carries the same names)."""

    save_every: int = PRESET.save_every
    health_preview_every: int | None = None  # None: chosen by :func:`choose_health_preview_every`
    validation_images: int = PRESET.validation_images
    health_preview_resolution: int = PRESET.health_preview_resolution
    health_sample_steps: int = PRESET.sample_steps

    @classmethod
    def of(cls, config) -> "CheckpointSettings":
        """The settings of a ``TrainConfig``."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def checkpoint_work(
    shape: "ModelShape", resolution: int, training_step: float, images: int, training_steps: int, settings
) -> CheckpointWork | None:
    """The health work of one checkpoint of a run (None when it saves no checkpoints)."""
    if not settings.save_every:
        return None
    validated = min(images, settings.validation_images) * len(PRESET.validation_sigmas)
    validation = flops(shape, resolution).forward * validated
    preview_side = min(resolution, settings.health_preview_resolution)
    preview = flops(shape, preview_side).forward * 2 * settings.health_sample_steps
    training_between = training_step * settings.save_every
    every = settings.health_preview_every or choose_health_preview_every(
        validation, preview, training_between, training_steps // settings.save_every if training_steps else None
    )
    fraction = (validation + preview / every) / training_between
    return CheckpointWork(validation / 1e12, preview / 1e12, every, fraction)


@dataclass(frozen=True)
class Estimate:
    """The whole estimate of one run setting. Times are predictions (see the module docstring)."""

    variant: str
    resolution: int
    rank: int
    mode: Mode
    batch_size: int
    grad_accum: int
    training_steps: int
    image_tokens: int
    forward_tflop: float
    training_step_tflop: float
    preview_tflop: float
    memory: Memory
    time_device: str | None
    peak_tflops: float | None
    mfu: float
    seconds_per_training_step: float | None
    training_seconds: float | None
    preview_seconds: float | None
    preview_sample_steps: int = PRESET.sample_steps
    checkpoint: CheckpointWork | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def memory_gib(self) -> float:
        return self.memory.total

    def as_dict(self) -> dict:
        out = asdict(self)
        out["mode"] = {**asdict(self.mode), "label": self.mode.label}
        out["memory"] = {**asdict(self.memory), "total": self.memory.total}
        out["memory_gib"] = self.memory.total
        if self.checkpoint is not None:
            out["checkpoint"]["tflop"] = self.checkpoint.tflop
        out["notes"] = list(self.notes)
        return out

    def summary(self) -> str:
        """One line: VRAM, then time (labelled a prediction)."""
        text = (
            f"estimate ({self.variant}, {self.resolution} px, rank {self.rank}, {self.mode.label}): "
            f"~{self.memory.total:.1f} GiB VRAM, {self.training_step_tflop:.1f} TFLOP per training step"
        )
        if self.seconds_per_training_step is not None:
            text += f", ~{self.seconds_per_training_step:.2f} s/training step on {self.time_device}"
            if self.training_steps:
                text += f" (~{_duration(self.training_seconds)} for {self.training_steps} training steps)"
            text += f" at {self.mfu:.0%} MFU (predicted)"
        if self.checkpoint is not None:
            text += f"; checkpoint health work ~{self.checkpoint.fraction:.0%} of the training between checkpoints"
            if self.peak_tflops:
                seconds = self.checkpoint.tflop / (self.peak_tflops * self.mfu)
                text += f" (~{_duration(seconds)} each)"
            if self.checkpoint.health_preview_every > 1:
                text += f" with health previews at every {ordinal(self.checkpoint.health_preview_every)} checkpoint"
        return text


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th ... 11th, 12th, 13th, 21st."""
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes = seconds / 60
    return f"{minutes / 60:.1f} h" if minutes >= 90 else f"{minutes:.0f} min" if minutes >= 1 else f"{seconds:.0f} s"


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _check_settings(
    resolution: int, rank: int, batch_size: int, grad_accum: int, images: int, training_steps: int, mfu: float
) -> None:
    """Refuse a setting no run can have, by name."""
    for name, value in (
        ("resolution", resolution),
        ("rank", rank),
        ("batch_size", batch_size),
        ("grad_accum", grad_accum),
        ("images", images),
    ):
        _positive(name, value)
    if resolution % PATCH_PIXELS:
        raise PlanError(f"resolution must be a multiple of {PATCH_PIXELS} px, got {resolution}")
    if isinstance(training_steps, bool) or not isinstance(training_steps, int) or training_steps < 0:
        raise PlanError(f"training_steps must be a whole number >= 0, got {training_steps!r}")
    if not 0 < mfu <= 1:
        raise PlanError(f"mfu must be in (0, 1], got {mfu!r}")


def estimate(
    variant: "str | ModelShape | dict" = "9B",
    resolution: int = PRESET.resolution,
    rank: int = PRESET.rank,
    mode: Mode = Mode(),
    training_steps: int = 0,
    *,
    batch_size: int = PRESET.batch_size,
    grad_accum: int = PRESET.grad_accum,
    images: int = 1,
    resolutions: int = 1,
    device_name: str | None = None,
    peak: float | None = None,
    mfu: float = ASSUMED_MFU,
    preview_sample_steps: int = PRESET.sample_steps,
    preview_cfg: float = PRESET.cfg,
    checkpoints: CheckpointSettings = CheckpointSettings(),
    empty_prompt_preservation: bool = False,  # per micro-batch also a base forward and a LoRA forward+backward
) -> Estimate:
    """Estimate VRAM and time of a run. ``device_name`` picks the peak from ``PEAK_TFLOPS`` (``peak`` overrides it);
    with neither, times are for ``REFERENCE_DEVICE``. ``resolution`` is the largest training resolution."""
    shape = model_shape(variant)
    _check_settings(resolution, rank, batch_size, grad_accum, images, training_steps, mfu)
    micro = flops(shape, resolution, rank, batch_size)
    micro_step = micro.training_step(mode.checkpointed(shape.blocks) / shape.blocks)
    step = (2 * micro_step + micro.forward if empty_prompt_preservation else micro_step) * grad_accum
    preview = micro.forward / batch_size * preview_sample_steps * (2 if preview_cfg > 1 else 1)
    notes = []
    time_device, peak_value = None, peak
    if peak_value is None:
        found = peak_tflops(device_name) if device_name else peak_tflops(REFERENCE_DEVICE)
        if found:
            time_device, peak_value = (device_name or found[0]), found[1]
        else:
            notes.append(f"no peak TFLOP/s known for {device_name!r}: no time estimate (pass peak=)")
    else:
        time_device = device_name or "the given peak"
    seconds = step / (peak_value * 1e12 * mfu) if peak_value else None
    if mode.base_8bit:
        notes.append("8-bit base: same FLOPs assumed; weight-only int8 dequantises per layer, so expect it slower")
    return Estimate(
        variant=shape.name,
        resolution=int(resolution),
        rank=int(rank),
        mode=mode,
        batch_size=batch_size,
        grad_accum=grad_accum,
        training_steps=training_steps,
        image_tokens=image_tokens(resolution),
        forward_tflop=micro.forward / 1e12,
        training_step_tflop=step / 1e12,
        preview_tflop=preview / 1e12,
        memory=memory(shape, resolution, rank, mode, batch_size, images, resolutions),
        time_device=time_device,
        peak_tflops=peak_value,
        mfu=mfu,
        seconds_per_training_step=seconds,
        training_seconds=seconds * training_steps if seconds is not None else None,
        preview_seconds=preview / (peak_value * 1e12 * mfu) if peak_value else None,
        preview_sample_steps=preview_sample_steps,
        checkpoint=checkpoint_work(shape, resolution, step, images, training_steps, checkpoints),
        notes=tuple(notes),
    )


def usable_gib(gpu_memory_gib: float) -> float:
    """What a phase may peak at on a card of ``gpu_memory_gib`` (as torch reports it: total memory / 2^30): the card
    less the allocator's slack, less the CUDA context. The fit-check audit judges its phases by the same rule."""
    return gpu_memory_gib * USABLE_FRACTION - CONTEXT_GIB


def fits(estimate_: Estimate, gpu_memory_gib: float) -> bool:
    """True when every estimated phase fits a GPU of ``gpu_memory_gib``."""
    return estimate_.memory.peak - estimate_.memory.context <= usable_gib(gpu_memory_gib)
