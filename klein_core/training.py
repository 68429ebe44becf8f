"""The Klein Base LoRA training loop: one loop you can read top to bottom.

Flow matching as Klein Base is trained: x0 = cached normalised latents, σ ~ a resolution-shifted logit-normal,
xt = (1-σ)·x0 + σ·noise, the transformer predicts ``noise - x0`` (MSE). One **training step** is one optimizer
update over ``grad_accum`` micro-batches of ``batch_size`` images: the only step counter, in names, logs,
progress and checkpoint file names.

σ sampling: u ~ N(0, 1), σ = sigmoid(u) (logit-normal: most samples in the middle of the noise range, where
composition and identity are decided), then the exponential shift σ' = e^μ σ / (1 + (e^μ - 1) σ) with μ rising
linearly from 0.5 at 256 image tokens to 1.15 at 4096 (the scheduler's base/max shift). Larger images keep more
signal at a given σ, so the shift moves them towards more noise, as FLUX training and Klein's sampler do.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import lora as lora_io
from .atomic import atomic_torch_save, atomic_write_json
from .cache import EmbeddingCache, latent_requests, prompts_to_cache
from .dataset import BucketBatchSampler, DatasetScan, DatasetSpec, fingerprint_parts, substitute_trigger
from .errors import KleinError, ResumeError
from .latents import encode_images, image_ids, pack
from .loading import ResolvedModel, load_text_encoder, load_transformer, load_vae
from .planner import Plan, plan
from .preset import PRESET
from .text import encode_prompts, text_ids

STATE_FILE = "training_state.pt"
MANIFEST_FILE = "run.json"
BASE_SHIFT, MAX_SHIFT, BASE_TOKENS, MAX_TOKENS = 0.5, 1.15, 256, 4096
VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)
VALIDATION_SEED = 20260115


class TrainingInterrupted(KleinError):
    """The user cancelled; the last completed training step was saved (the message says where)."""


class NonFiniteLoss(KleinError):
    """The loss went NaN/inf; training stopped and the last good checkpoint was kept."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults are the Klein 9B Base starter preset."""

    output_name: str = "klein_lora"
    training_steps: int | None = None  # None: planned from target_repeats
    target_repeats: float = PRESET.target_repeats
    batch_size: int = PRESET.batch_size
    grad_accum: int = PRESET.grad_accum
    learning_rate: float = PRESET.learning_rate
    warmup_steps: int = 0
    rank: int = PRESET.rank
    alpha: float | None = None  # None: alpha = rank
    seed: int = 0
    save_every: int = 250  # training steps between LoRA checkpoints (0: only the final LoRA)
    keep_last: int = 0  # keep only the newest N step checkpoints (0: keep all)
    gradient_checkpointing: bool = False
    log_every: int = 1  # training steps between loss reads (the only host-device sync)
    validation_every: int = 0  # extra fixed-noise validation every K training steps (checkpoints always get one)
    stop_on_collapse: bool = False
    weight_decay: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Checkpoint:
    training_step: int
    path: Path
    train_loss: float | None = None
    validation_loss: float | None = None


@dataclass
class TrainCallbacks:
    """Hooks the fronts supply: ComfyUI's progress bar and cancel, the CLI's progress line and signals."""

    on_step: Callable[[dict], None] | None = None  # {training_step, training_steps, loss, s_per_step, eta_s}
    should_stop: Callable[[], bool] | None = None  # checked every micro-batch; may also raise to cancel
    on_checkpoint: Callable[[Checkpoint], None] | None = None
    log: Callable[[str], None] = print


@dataclass
class TrainedRun:
    """What training leaves in memory for previews (``KLEIN_LORA_RUN``): no second model load needed."""

    transformer: torch.nn.Module  # plain base transformer (adapter removed, base weights untouched)
    vae: torch.nn.Module
    checkpoints: list[tuple[int, Path, lora_io.LoraWeights]]
    preview_embeds: dict[str, torch.Tensor]
    trigger: str
    resolution: int
    run_dir: Path
    final_lora: Path
    plan: Plan
    manifest: dict
    is_distilled: bool = False


@dataclass
class DistributedContext:
    """Rank-awareness for torchrun/accelerate DDP: rank 0 saves and logs; the sampler shards by rank."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "DistributedContext":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --- small pure pieces ------------------------------------------------------------------------------------------
def timestep_shift_mu(image_tokens: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return BASE_SHIFT + slope * (image_tokens - BASE_TOKENS)


def sample_sigmas(batch: int, image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    sigma = torch.sigmoid(torch.randn(batch, generator=generator))
    shift = math.exp(timestep_shift_mu(image_tokens))
    return shift * sigma / (1 + (shift - 1) * sigma)


def micro_batch_generator(seed: int, training_step: int, micro: int) -> torch.Generator:
    """Noise, σ and nothing else depend on (seed, step, micro-batch): resume reproduces an unbroken run."""
    digest = hashlib.sha256(f"klein-train:{seed}:{training_step}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def flow_matching_loss(transformer, latents: torch.Tensor, embeds: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """MSE between the prediction at xt = (1-σ)x0 + σ·noise and the target noise - x0 (latents: B,128,h,w)."""
    b, _, h, w = latents.shape
    s = sigma.view(b, 1, 1, 1).to(latents.dtype)
    noisy = (1 - s) * latents + s * noise
    param = next(transformer.parameters())
    prediction = transformer(
        hidden_states=pack(noisy).to(param.dtype),
        encoder_hidden_states=embeds.to(param.dtype),
        timestep=sigma.to(param.dtype),
        img_ids=image_ids(b, h, w, latents.device),
        txt_ids=text_ids(b, embeds.shape[1], latents.device),
        guidance=None,
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(prediction.float(), pack(noise - latents).float())


@dataclass
class MicroBatch:
    latents: torch.Tensor  # (B,128,h,w) normalised
    embeds: torch.Tensor  # (B,512,3H)
    noise: torch.Tensor
    sigma: torch.Tensor


def accumulate_gradients(transformer, micro_batches: list[MicroBatch], should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Backward over the micro-batches of one training step, each loss scaled by 1/G. Returns the mean loss."""
    total = torch.zeros((), device=micro_batches[0].latents.device)
    for micro in micro_batches:
        if should_stop is not None and should_stop():
            raise TrainingInterrupted("cancelled")
        loss = flow_matching_loss(transformer, micro.latents, micro.embeds, micro.noise, micro.sigma)
        (loss / len(micro_batches)).backward()
        total = total + loss.detach() / len(micro_batches)
    return total


# --- the data the loop needs, encoded once ----------------------------------------------------------------------
@dataclass
class EncodedDataset:
    latents: list[torch.Tensor]  # per sample (item x resolution): (128, h, w)
    captions: list[str]  # per sample
    embeds: dict[str, torch.Tensor]  # caption text -> (512, 3H), incl. dropped caption and ""
    sample_buckets: list[tuple]
    text_encoder_calls: int = 0
    vae_encoder_calls: int = 0


def encode_dataset(
    resolved: ResolvedModel,
    scan: DatasetScan,
    spec: DatasetSpec,
    preview_prompts: tuple[str, ...],
    cache_dir: Path | None,
    device,
    log: Callable[[str], None],
) -> tuple[EncodedDataset, torch.nn.Module]:
    """Latents and text embeddings through the on-disk cache. The text encoder is loaded only on a cache miss and
    released before the transformer is loaded; returns the VAE (kept for previews)."""
    cache = EmbeddingCache(cache_dir, resolved.identity)
    texts = prompts_to_cache(scan, spec, preview_prompts)
    loaded: list = []

    def encode_text(prompts: list[str]) -> torch.Tensor:
        if not loaded:
            log("encoding captions with the text encoder (cache miss)")
            loaded.append(load_text_encoder(resolved, dtype=_dtype(device), device=device))
        text_encoder, tokenizer = loaded[0]
        return encode_prompts(text_encoder, tokenizer, prompts)

    embeds = dict(zip(texts, cache.get_or_compute_text(texts, encode_text)))
    loaded.clear()  # the text encoder is never resident together with the transformer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    vae = load_vae(resolved, dtype=torch.float32, device=device)
    latents = cache.get_or_compute_latents(latent_requests(scan), lambda pixels: encode_images(vae, pixels.to(device)))
    samples = scan.samples()
    encoded = EncodedDataset(
        latents=[latent.to(device) for latent in latents],
        captions=[scan.items[s.item_index].caption for s in samples],
        embeds={text: value.to(device) for text, value in embeds.items()},
        sample_buckets=[(s.resolution, tuple(s.bucket)) for s in samples],
        text_encoder_calls=cache.stats.text_misses,
        vae_encoder_calls=cache.stats.latent_misses,
    )
    return encoded, vae


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- run folder -------------------------------------------------------------------------------------------------
def checkpoint_name(output_name: str, training_step: int) -> str:
    return f"{output_name}_step{training_step:06d}.safetensors"


def _resume_check(state: dict, config: TrainConfig, fingerprint: dict[str, str], allow_changes: bool) -> None:
    changed = [k for k in sorted(fingerprint) if state["fingerprint"].get(k) != fingerprint[k]]
    old_config = state["config"]
    for key in ("batch_size", "grad_accum", "learning_rate", "rank", "alpha", "seed", "warmup_steps", "training_steps"):
        if old_config.get(key) != getattr(config, key):
            changed.append(f"{key} ({old_config.get(key)} -> {getattr(config, key)})")
    if changed and not allow_changes:
        raise ResumeError(
            f"cannot resume: {', '.join(changed)} changed since the run started; restore them, start a new run, "
            "or override with --allow-changes"
        )


# --- the loop ---------------------------------------------------------------------------------------------------
def train(
    resolved: ResolvedModel,
    spec: DatasetSpec,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    callbacks: TrainCallbacks | None = None,
    preview_prompts: tuple[str, ...] = (),
    cache_dir: str | Path | None = None,
    resume: bool = False,
    allow_changes: bool = False,
    device: str | None = None,
    dist: DistributedContext | None = None,
) -> TrainedRun:
    """Train a Klein Base LoRA and return the in-memory run. Every file written is atomic."""
    callbacks = callbacks or TrainCallbacks()
    dist = dist or DistributedContext.from_env()
    device = device or default_device()
    log = callbacks.log if dist.is_main else (lambda _msg: None)
    run_dir = Path(run_dir)

    # 1. Everything a user can get wrong is checked before any model loads.
    scan = spec.scan()
    the_plan = plan(len(scan.items), config.target_repeats, config.batch_size, config.grad_accum, config.training_steps)
    config = replace(config, training_steps=the_plan.training_steps)
    fingerprint = fingerprint_parts(scan, spec)
    state = None
    if resume:
        if not (run_dir / STATE_FILE).exists():
            raise ResumeError(f"nothing to resume in {run_dir}: no {STATE_FILE}")
        state = torch.load(run_dir / STATE_FILE, weights_only=False)
        _resume_check(state, config, fingerprint, allow_changes)
    for warning in scan.warnings:
        log(f"warning: {warning}")
    log(
        f"plan: N={the_plan.images} images, B={the_plan.batch_size}, G={the_plan.grad_accum}, "
        f"S={the_plan.training_steps} training steps, {the_plan.repeats_per_image:.1f} repeats per image ({the_plan.band})"
    )

    # 2. Encode once (cached), free the text encoder, then load the transformer.
    prompts = tuple(dict.fromkeys(substitute_trigger(p, scan.trigger) for p in preview_prompts))
    data, vae = encode_dataset(resolved, scan, spec, prompts, cache_dir, device, log)
    transformer = load_transformer(resolved, dtype=_dtype(device), device=device)
    transformer.requires_grad_(False)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora_io.add_lora(transformer, config.rank, config.alpha)
    params = lora_io.lora_parameters(transformer)
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=str(device).startswith("cuda")
    )
    warmup = max(0, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)

    sampler = BucketBatchSampler(data.sample_buckets, config.batch_size, seed=config.seed, rank=dist.rank, world_size=dist.world_size)
    dropout = spec.dropout(config.seed)
    manifest = _new_manifest(resolved, spec, scan, config, the_plan, fingerprint)
    start_step = 0
    checkpoints: list[Checkpoint] = []
    if state is not None:
        lora_io.load_adapter_weights(transformer, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_step = state["training_step"]
        manifest = state["manifest"]
        checkpoints = [Checkpoint(c["training_step"], Path(c["path"]), c.get("train_loss"), c.get("validation_loss")) for c in manifest["checkpoints"]]
        log(f"resuming {run_dir} at training step {start_step}/{config.training_steps}")

    def micro_batches_for(step: int) -> list[MicroBatch]:
        out = []
        for micro in range(config.grad_accum):
            epoch, batch = sampler.batch_at(step * config.grad_accum + micro)
            generator = micro_batch_generator(config.seed, step, micro)
            latents = torch.stack([data.latents[i] for i in batch])
            captions = [dropout.caption_for(data.captions[i], scan.trigger, epoch, i) for i in batch]
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            tokens = latents.shape[-1] * latents.shape[-2]
            sigma = sample_sigmas(len(batch), tokens, generator).to(device)
            out.append(MicroBatch(latents, torch.stack([data.embeds[c] for c in captions]), noise, sigma))
        return out

    def save_checkpoint(step: int, loss: float | None, validate: bool = True) -> Checkpoint:
        path = run_dir / checkpoint_name(config.output_name, step)
        weights = lora_io.adapter_weights(transformer)
        checkpoint = Checkpoint(step, path, loss, validation_loss(transformer, data) if validate else None)
        if dist.is_main:
            lora_io.save_lora(path, weights, _lora_metadata(spec, config, the_plan, step, resolved))
            checkpoints.append(checkpoint)
            _prune(checkpoints, config.keep_last)
            manifest["checkpoints"] = [_checkpoint_dict(c) for c in checkpoints]
            atomic_torch_save(
                {
                    "training_step": step,
                    "lora": weights,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "config": config.as_dict(),
                    "fingerprint": fingerprint,
                    "manifest": manifest,
                },
                run_dir / STATE_FILE,
            )
            atomic_write_json(run_dir / MANIFEST_FILE, manifest)
            if callbacks.on_checkpoint:
                callbacks.on_checkpoint(checkpoint)
        return checkpoint

    # 3. The loop: one training step = one optimizer update over G micro-batches.
    transformer.train()
    pending: list[torch.Tensor] = []
    step = start_step
    started = time.perf_counter()
    try:
        while step < config.training_steps:
            stop = callbacks.should_stop
            loss = accumulate_gradients(transformer, micro_batches_for(step), stop)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append(loss)
            is_checkpoint = config.save_every and step % config.save_every == 0 and step < config.training_steps
            if step % max(1, config.log_every) == 0 or is_checkpoint or step == config.training_steps:
                values = torch.stack(pending).tolist()  # the one host-device sync
                pending.clear()
                first = step - len(values) + 1
                manifest["train_loss"].extend([[first + i, v] for i, v in enumerate(values)])
                if not all(math.isfinite(v) for v in values):
                    raise NonFiniteLoss(_non_finite_message(step, checkpoints, config))
                elapsed = time.perf_counter() - started
                per_step = elapsed / (step - start_step)
                if callbacks.on_step:
                    callbacks.on_step(
                        {"training_step": step, "training_steps": config.training_steps, "loss": values[-1],
                         "s_per_step": per_step, "eta_s": per_step * (config.training_steps - step)}
                    )
            if is_checkpoint:
                save_checkpoint(step, manifest["train_loss"][-1][1])
    except BaseException as exc:
        if isinstance(exc, NonFiniteLoss):
            raise
        completed = step
        if completed > start_step and dist.is_main and not any(c.training_step == completed for c in checkpoints):
            manifest["train_loss"].extend(
                [[completed - len(pending) + 1 + i, v] for i, v in enumerate(torch.stack(pending).tolist())] if pending else []
            )
            saved = save_checkpoint(completed, manifest["train_loss"][-1][1] if manifest["train_loss"] else None, validate=False)
            message = f"training stopped at training step {completed}/{config.training_steps}; saved {saved.path} (resume with --resume {run_dir})"
        else:
            last = checkpoints[-1].path if checkpoints else "nothing yet"
            message = f"training stopped at training step {completed}/{config.training_steps}; last checkpoint: {last}"
        log(message)
        if isinstance(exc, TrainingInterrupted):
            raise TrainingInterrupted(message) from None
        raise

    # 4. The final LoRA, the manifest, and the in-memory run for previews.
    final_path = run_dir / f"{config.output_name}.safetensors"
    final = save_checkpoint(step, manifest["train_loss"][-1][1] if manifest["train_loss"] else None)
    weights = lora_io.adapter_weights(transformer)
    if dist.is_main:
        lora_io.save_lora(final_path, weights, _lora_metadata(spec, config, the_plan, step, resolved))
        manifest["final_lora"] = str(final_path)
        atomic_write_json(run_dir / MANIFEST_FILE, manifest)
    lora_io.remove_lora(transformer)
    transformer.eval()
    kept = [(c.training_step, c.path, lora_io.read_lora_file(c.path)) for c in checkpoints if c.path.exists()]
    return TrainedRun(
        transformer=transformer,
        vae=vae,
        checkpoints=kept,
        preview_embeds={p: data.embeds[p] for p in (*prompts, "")},
        trigger=scan.trigger,
        resolution=spec.resolutions[0],
        run_dir=run_dir,
        final_lora=final_path,
        plan=the_plan,
        manifest=manifest,
    )


@torch.no_grad()
def validation_loss(transformer, data: EncodedDataset) -> float:
    """Flow-matching loss on every training image at fixed σ values with fixed noise: comparable across steps."""
    was_training = transformer.training
    transformer.eval()
    total, count = 0.0, 0
    for index, latents in enumerate(data.latents):
        generator = torch.Generator().manual_seed(VALIDATION_SEED + index)
        noise = torch.randn((1, *latents.shape), generator=generator).to(latents.device, latents.dtype)
        embeds = data.embeds[data.captions[index]].unsqueeze(0)
        for sigma in VALIDATION_SIGMAS:
            s = torch.tensor([sigma], device=latents.device)
            total += flow_matching_loss(transformer, latents.unsqueeze(0), embeds, noise, s).item()
            count += 1
    transformer.train(was_training)
    return total / count


def _prune(checkpoints: list[Checkpoint], keep_last: int) -> None:
    if keep_last <= 0:
        return
    while len(checkpoints) > keep_last:
        old = checkpoints.pop(0)
        old.path.unlink(missing_ok=True)


def _checkpoint_dict(c: Checkpoint) -> dict:
    return {"training_step": c.training_step, "path": str(c.path), "train_loss": c.train_loss, "validation_loss": c.validation_loss}


def _lora_metadata(spec: DatasetSpec, config: TrainConfig, the_plan: Plan, step: int, resolved: ResolvedModel) -> dict:
    return {
        "trigger_word": spec.trigger,
        "rank": config.rank,
        "alpha": config.alpha if config.alpha is not None else config.rank,
        "training_steps": step,
        "repeats_per_image": f"{step * config.batch_size * config.grad_accum / the_plan.images:.2f}",
        "base_model": f"FLUX.2 [klein] Base {resolved.variant.name}",
        "resolution": ",".join(str(r) for r in spec.resolutions),
    }


def _new_manifest(resolved, spec, scan, config, the_plan, fingerprint) -> dict:
    return {
        "config": config.as_dict(),
        "plan": the_plan.as_dict(),
        "dataset": {**spec.as_dict(), "images": len(scan.items), "fingerprint": fingerprint},
        "model": {"variant": resolved.variant.name, "format": resolved.format, "identity": resolved.identity},
        "train_loss": [],
        "checkpoints": [],
        "final_lora": None,
    }


def _non_finite_message(step: int, checkpoints: list[Checkpoint], config: TrainConfig) -> str:
    last = checkpoints[-1].path if checkpoints else "none saved yet"
    lower = PRESET.unstable_learning_rate if config.learning_rate > PRESET.unstable_learning_rate else config.learning_rate / 2
    return (
        f"the loss became non-finite at training step {step}; training stopped and the last good checkpoint is kept "
        f"({last}). Lower the learning rate: LR {config.learning_rate:g} -> {lower:g}"
    )
