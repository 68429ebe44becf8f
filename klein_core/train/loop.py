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

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import atomic_torch_save, atomic_write_json
from ..data.buckets import BucketBatchSampler
from ..data.cache import EmbeddingCache, latent_requests, prompts_to_cache
from ..data.captions import substitute_trigger
from ..data.images import load_image_rgb
from ..data.scan import DatasetScan
from ..data.spec import DatasetSpec, changed_fingerprint_parts, fingerprint_parts
from ..errors import DatasetError, NonFiniteLoss, ResumeError, TrainingInterrupted
from ..health.advice import non_finite_loss_message
from ..health.collapse import CollapseReport
from ..health.history import TrainingHistory
from ..health.monitor import HealthMonitor
from ..model import lora as lora_io
from ..model.latents import encode_images
from ..model.loading import ResolvedModel, load_text_encoder, load_transformer, load_vae
from ..model.text import encode_prompts
from ..preset import PRESET
from .config import DistributedContext, SavedCheckpoint, TrainCallbacks, TrainConfig, TrainedRun
from .objective import (
    MicroBatch,
    accumulate_gradients,
    micro_batch_generator,
    sample_sigmas,
    validation_loss,
)
from .planner import Plan, plan

STATE_FILE = "training_state.pt"
MANIFEST_FILE = "run.json"


# --- the data the loop needs, encoded once ----------------------------------------------------------------------
@dataclass
class EncodedDataset:
    latents: list[torch.Tensor]  # per sample (item x resolution): (128, h, w)
    captions: list[str]  # per sample
    embeds: dict[str, torch.Tensor]  # caption text -> (512, 3H), incl. dropped caption and ""
    sample_buckets: list[tuple]
    text_encoder_calls: int = 0
    vae_encoder_calls: int = 0


def encode_datasets(
    resolved: ResolvedModel,
    datasets: list[tuple[DatasetScan, DatasetSpec]],
    preview_prompts: tuple[str, ...],
    cache_dir: Path | None,
    device,
    log: Callable[[str], None],
) -> tuple[list[EncodedDataset], torch.nn.Module]:
    """Latents and text embeddings of each dataset (identity set, then the optional regularization and held-out
    sets) through the on-disk cache. The text encoder is loaded only on a cache miss and released before the
    transformer is loaded; returns the VAE too (kept for previews)."""
    cache = EmbeddingCache(cache_dir, resolved.identity)
    texts = list(dict.fromkeys(t for scan, spec in datasets for t in prompts_to_cache(scan, spec, preview_prompts)))
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
    embeds = {text: value.to(device) for text, value in embeds.items()}

    vae = load_vae(resolved, dtype=torch.float32, device=device)
    encoded = []
    for scan, _spec in datasets:
        latents = cache.get_or_compute_latents(latent_requests(scan), lambda pixels: encode_images(vae, pixels.to(device)))
        samples = scan.samples()
        encoded.append(EncodedDataset(
            latents=[latent.to(device) for latent in latents],
            captions=[scan.items[s.item_index].caption for s in samples],
            embeds=embeds,
            sample_buckets=[(s.resolution, tuple(s.bucket)) for s in samples],
            text_encoder_calls=cache.stats.text_misses,
            vae_encoder_calls=cache.stats.latent_misses,
        ))
    return encoded, vae


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- run folder -------------------------------------------------------------------------------------------------
def checkpoint_name(output_name: str, training_step: int) -> str:
    return f"{output_name}_step{training_step:06d}.safetensors"


def _resume_check(state: dict, config: TrainConfig, fingerprint: dict[str, str], allow_changes: bool) -> None:
    changed = changed_fingerprint_parts(state["fingerprint"], fingerprint)
    old_config = state["config"]
    for key in ("batch_size", "grad_accum", "learning_rate", "rank", "alpha", "seed", "warmup_steps", "training_steps"):
        if old_config.get(key) != getattr(config, key):
            changed.append(f"{key} ({old_config.get(key)} -> {getattr(config, key)})")
    if changed and not allow_changes:
        raise ResumeError(
            f"cannot resume: {', '.join(changed)} changed since the run started; restore them, start a new run, "
            "or override with --allow-changes"
        )


def regularization_summary(images: int, weight: float, repeats_per_image: float) -> str:
    """One line for the log and the node summary: the class images' share, shown apart from the identity dose."""
    return (f"regularization: {images} class images at weight {weight:g} "
            f"({repeats_per_image:.1f} repeats each; not counted in the identity dose)")


# --- the loop ---------------------------------------------------------------------------------------------------
def train(
    resolved: ResolvedModel,
    spec: DatasetSpec,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    callbacks: TrainCallbacks | None = None,
    preview_prompts: tuple[str, ...] = (),
    regularization: DatasetSpec | None = None,
    held_out: DatasetSpec | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    allow_changes: bool = False,
    device: str | None = None,
    dist: DistributedContext | None = None,
) -> TrainedRun:
    """Train a Klein Base LoRA and return the in-memory run. Every file written is atomic.

    ``regularization`` is an optional folder of class images ("photo of a person") mixed into every micro-batch at
    ``config.regularization_weight``; the planner's repeats per image count the identity images only. It is read as
    a regularization set whatever its spec says (``DatasetSpec.as_regularization``: no caption may carry the
    trigger, no dropout). ``held_out`` is an optional folder of images of the same person kept out of training: their
    fixed-noise validation loss is recorded next to the training images' at every checkpoint (the honest measure of
    generalisation) and, without likeness scores, picks the best checkpoint.
    """
    callbacks = callbacks or TrainCallbacks()
    dist = dist or DistributedContext.from_env()
    device = device or default_device()
    log = callbacks.log if dist.is_main else (lambda _msg: None)
    run_dir = Path(run_dir)

    # 1. Everything a user can get wrong is checked before any model loads.
    if spec.trigger_policy == "exclude":
        raise DatasetError(f"{spec.folder}: trigger_policy 'exclude' is for a regularization set of class images; "
                           "the identity dataset needs 'prepend', 'append' or 'keep'")
    scan = spec.scan()
    if regularization is not None:
        regularization = regularization.as_regularization(scan.trigger)
    reg_scan = regularization.scan() if regularization is not None else None
    held_scan = held_out.scan() if held_out is not None else None
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
    if reg_scan is not None:
        reg_repeats = the_plan.training_steps * config.batch_size * config.grad_accum / len(reg_scan.items)
        log(regularization_summary(len(reg_scan.items), config.regularization_weight, reg_repeats))
    if held_scan is not None:
        log(f"held out: {len(held_scan.items)} images, never trained on; their validation loss is recorded per checkpoint")
        for warning in _held_out_overlap(scan, held_scan):
            log(f"warning: {warning}")
    if config.base_8bit:
        from ..model.lowvram import choose_backend

        choose_backend()  # a missing optional backend fails here, before any model loads
    config = replace(config, gradient_checkpointing=_estimate_memory_mode(resolved, spec, scan, config, device, log))

    # 2. Encode once (cached), free the text encoder, then load the transformer.
    prompts = tuple(dict.fromkeys(substitute_trigger(p, scan.trigger) for p in preview_prompts))
    datasets = [(s, d) for s, d in ((scan, spec), (reg_scan, regularization), (held_scan, held_out)) if s is not None]
    encoded, vae = encode_datasets(resolved, datasets, prompts, cache_dir, device, log)
    data, extra = encoded[0], iter(encoded[1:])
    reg_data = next(extra) if reg_scan is not None else None
    held_data = next(extra) if held_scan is not None else None
    # The 8-bit base loads on the CPU and reaches the device block by block, already quantised.
    transformer = load_transformer(resolved, dtype=_dtype(device), device="cpu" if config.base_8bit else device)
    transformer.requires_grad_(False)
    if config.base_8bit:
        from ..model.lowvram import quantize_base_8bit

        log(f"8-bit base: block weights quantised to int8 with {quantize_base_8bit(transformer, device)}")
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the adapter's initial A matrices depend on the seed alone
        lora_io.add_lora(transformer, config.rank, config.alpha)
    if config.compile_blocks:
        for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
            block.compile()  # in place: parameter names (and so LoRA keys) are unchanged
    params = lora_io.lora_parameters(transformer)
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=str(device).startswith("cuda")
    )
    warmup = max(0, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)

    sampler = BucketBatchSampler(data.sample_buckets, config.batch_size, seed=config.seed, rank=dist.rank, world_size=dist.world_size)
    reg_sampler = (
        BucketBatchSampler(reg_data.sample_buckets, config.batch_size, seed=config.seed + 1, rank=dist.rank, world_size=dist.world_size)
        if reg_data is not None else None
    )
    dropout = spec.dropout(config.seed)
    monitor = HealthMonitor(
        config.learning_rate, config.rank, has_regularization=reg_data is not None,
        preview=_health_preview(transformer, vae, data, prompts, spec, config) if config.health_previews else None,
        references=[_reference_image(item) for item in scan.items] if config.health_previews and prompts else None,
    )
    manifest = _new_manifest(resolved, spec, scan, config, the_plan, fingerprint, reg_scan, held_scan)

    def checkpoint_losses() -> tuple[float, float | None]:
        """The fixed-noise validation loss on the training images, and on the held-out images when there are some."""
        trained = validation_loss(transformer, data.latents, _caption_embeds(data))
        if held_data is None:
            return trained, None
        return trained, validation_loss(transformer, held_data.latents, _caption_embeds(held_data))
    start_step = 0
    if state is not None:
        lora_io.load_adapter_weights(transformer, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_learning_rate(optimizer, scheduler, config.learning_rate)  # a changed LR (--allow-changes) takes effect
        torch.set_rng_state(state["torch_rng"])
        start_step = state["training_step"]
        saved_manifest = state["manifest"]  # keep what happened; describe the run as it is configured now
        manifest = dict(manifest, history=saved_manifest["history"], checkpoints=saved_manifest["checkpoints"])
        monitor.history = TrainingHistory.from_dict(manifest["history"])
        log(f"resuming {run_dir} at training step {start_step}/{config.training_steps}")
    elif dist.is_main:  # step 0, the untrained base: the baseline of the validation loss and the health previews
        monitor.record_checkpoint(0, None, *checkpoint_losses())

    def micro_batches_for(step: int) -> list[MicroBatch]:
        out = []
        for micro in range(config.grad_accum):
            position = step * config.grad_accum + micro
            generator = micro_batch_generator(config.seed, step, micro)
            epoch, batch = sampler.batch_at(position)
            captions = [dropout.caption_for(data.captions[i], scan.trigger, epoch, i) for i in batch]
            out.append(_micro_batch(data, batch, captions, generator, device))
            if reg_sampler is not None:
                _, reg_batch = reg_sampler.batch_at(position)
                reg = _micro_batch(reg_data, reg_batch, [reg_data.captions[i] for i in reg_batch], generator, device)
                out.append(replace(reg, weight=config.regularization_weight, is_regularization=True))
        return out

    def save_checkpoint(step: int, with_health: bool = True) -> Path:
        path = run_dir / checkpoint_name(config.output_name, step)
        weights = lora_io.adapter_weights(transformer)
        losses = checkpoint_losses() if with_health else (None, None)
        if not dist.is_main:
            return path
        lora_io.save_lora(path, weights, _lora_metadata(spec, config, the_plan, step, resolved))
        if with_health:
            monitor.record_checkpoint(step, str(path), *losses)
        else:
            monitor.history.add_checkpoint(step, str(path))
        _prune(monitor.history, config.keep_last)
        manifest["history"] = monitor.history.as_dict()
        manifest["checkpoints"] = [str(c.lora_path) for c in monitor.history.checkpoints if c.lora_path]
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
            callbacks.on_checkpoint(monitor.history.checkpoint_at(step))
        return path

    # 3. The loop: one training step = one optimizer update over G micro-batches.
    transformer.train()
    pending: list[torch.Tensor] = []
    step = start_step
    started = time.perf_counter()
    try:
        while step < config.training_steps:
            loss = accumulate_gradients(transformer, micro_batches_for(step), callbacks.should_stop)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append(loss)
            if callbacks.on_progress:
                callbacks.on_progress(step, config.training_steps)
            is_checkpoint = bool(config.save_every) and step % config.save_every == 0 and step < config.training_steps
            if step % max(1, config.log_every) == 0 or is_checkpoint or step == config.training_steps:
                values = torch.stack(pending).tolist()  # the one host-device sync
                pending.clear()
                first_step = step - len(values) + 1
                monitor.record_losses(first_step, values)
                bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
                if bad:
                    raise NonFiniteLoss(first_step + bad[0])
                per_step = (time.perf_counter() - started) / (step - start_step)
                if callbacks.on_step:
                    callbacks.on_step(
                        {"training_step": step, "training_steps": config.training_steps, "loss": values[-1],
                         "losses": [[first_step + i, v] for i, v in enumerate(values)],
                         "s_per_step": per_step, "eta_s": per_step * (config.training_steps - step)}
                    )
            if is_checkpoint:
                save_checkpoint(step)
            if config.validation_every and step % config.validation_every == 0 and not is_checkpoint and dist.is_main:
                val, held = checkpoint_losses()
                monitor.history.add_checkpoint(step, None, val, held_out_loss=held)
            collapse = monitor.check() if is_checkpoint or step % max(1, config.log_every) == 0 else None
            if collapse is not None and config.stop_on_collapse:
                log(f"collapse detected at training step {step}: stopping early (the verdict says where it began)")
                break
    except BaseException as exc:
        if isinstance(exc, NonFiniteLoss):  # a collapse: verdict, advice, best (last good) checkpoint, report
            if dist.is_main:
                exc.health = monitor.finish(run_dir, config.output_name)
                manifest.update(history=monitor.history.as_dict(), health=exc.health.as_dict())
                atomic_write_json(run_dir / MANIFEST_FILE, manifest)
                log(exc.health.verdict)
            collapse = exc.health.collapse if exc.health else monitor.check()
            exc.args = (_non_finite_message(exc.training_step, collapse, config),)  # the same last good checkpoint
            raise
        message = _save_on_stop(step, start_step, pending, monitor, save_checkpoint, config, run_dir, dist)
        log(message)
        if isinstance(exc, TrainingInterrupted):
            raise TrainingInterrupted(message) from None
        raise

    # 4. The final LoRA, the health verdict and best checkpoint, and the in-memory run for previews.
    final_path = run_dir / f"{config.output_name}.safetensors"
    if monitor.history.checkpoint_at(step) is None:
        save_checkpoint(step)
    summary = None
    if dist.is_main:
        lora_io.save_lora(final_path, lora_io.adapter_weights(transformer), _lora_metadata(spec, config, the_plan, step, resolved))
        summary = monitor.finish(run_dir, config.output_name)
        manifest.update(final_lora=str(final_path), history=monitor.history.as_dict(), health=summary.as_dict())
        atomic_write_json(run_dir / MANIFEST_FILE, manifest)
        log(summary.verdict)
    lora_io.remove_lora(transformer)
    transformer.eval()
    kept = [SavedCheckpoint(c.step, Path(c.lora_path), lora_io.read_lora_file(c.lora_path))
            for c in monitor.history.checkpoints if c.lora_path and Path(c.lora_path).exists()]
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
        history=monitor.history,
        health=summary,
    )


def _micro_batch(data: EncodedDataset, batch: list[int], captions: list[str], generator: torch.Generator, device) -> MicroBatch:
    latents = torch.stack([data.latents[i] for i in batch])
    noise = _host_to_device(torch.randn(latents.shape, generator=generator), device).to(latents.dtype)
    sigma = _host_to_device(sample_sigmas(len(batch), latents.shape[-1] * latents.shape[-2], generator), device)
    return MicroBatch(latents, torch.stack([data.embeds[c] for c in captions]), noise, sigma)


def _host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Noise and σ are drawn on the CPU (same numbers on every device). On CUDA they go through pinned memory with a
    non-blocking copy: a pageable copy would make the host wait for the previous training step's kernels each step."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _set_learning_rate(optimizer: torch.optim.Optimizer, scheduler, learning_rate: float) -> None:
    """Loading a saved optimizer and scheduler restores the LR the run started with; a resume that lowers the LR (the
    first fix for a collapse) must train at the new one, at the same point of the warmup."""
    scheduler.base_lrs = [learning_rate for _ in optimizer.param_groups]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor


def _caption_embeds(data: EncodedDataset) -> list[torch.Tensor]:
    return [data.embeds[c].unsqueeze(0) for c in data.captions]


def _reference_image(item) -> np.ndarray:
    """A training image as (H, W, 3) floats for likeness scoring (at most 512 px on its long side)."""

    image = load_image_rgb(item.path)
    image.thumbnail((512, 512))
    return np.asarray(image, dtype=np.float32) / 255.0


def _health_preview(transformer, vae, data: EncodedDataset, prompts: tuple[str, ...], spec: DatasetSpec, config: TrainConfig):
    """The first preview prompt rendered Base-correctly with the current adapter (for preview stats and likeness)."""
    if not prompts:
        return None
    from ..preview.sampling import sample_base

    size = spec.resolutions[0]

    def render() -> torch.Tensor:
        was_training = transformer.training
        transformer.eval()
        try:
            images = sample_base(transformer, vae, data.embeds[prompts[0]], data.embeds[""], size, size,
                                 sample_steps=config.health_sample_steps, seed=PRESET.preview_seed)
        finally:
            transformer.train(was_training)
        return images.permute(0, 2, 3, 1)  # (B, H, W, 3)

    return render


def _save_on_stop(step, start_step, pending, monitor, save_checkpoint, config, run_dir, dist) -> str:
    """On cancel or error: save the last completed training step (if new) and say where."""
    saved = [c.lora_path for c in monitor.history.checkpoints if c.lora_path]
    last = f"last checkpoint: {saved[-1] if saved else 'none yet'}"
    if pending:
        values = torch.stack(pending).tolist()
        monitor.record_losses(step - len(values) + 1, values)
        bad = [step - len(values) + 1 + i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:  # never save weights a non-finite loss has touched
            return (f"training stopped at training step {step}/{config.training_steps}; the loss had gone non-finite "
                    f"at training step {bad[0]}, so nothing was saved; {last}")
    if step > start_step and dist.is_main and monitor.history.checkpoint_at(step) is None:
        saved = save_checkpoint(step, with_health=False)
        return (f"training stopped at training step {step}/{config.training_steps}; saved {saved} "
                f"(resume with --resume, run folder {run_dir})")
    return f"training stopped at training step {step}/{config.training_steps}; {last}"


def _prune(history: TrainingHistory, keep_last: int) -> None:
    """Delete the oldest step checkpoints beyond ``keep_last`` (their health records stay, marked unsaved)."""
    if keep_last <= 0:
        return
    saved = [c for c in history.checkpoints if c.lora_path]
    for record in saved[:-keep_last]:
        Path(record.lora_path).unlink(missing_ok=True)
        record.lora_path = None


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


def _held_out_overlap(scan: DatasetScan, held_scan: DatasetScan) -> list[str]:
    """Held-out images that are byte-identical to a training image are not held out at all: say which."""
    trained = {item.sha256: item.name for item in scan.items}
    return [f"held-out image {item.name} is the same file as training image {trained[item.sha256]}: its loss is not "
            "held out" for item in held_scan.items if item.sha256 in trained]


def _new_manifest(resolved, spec, scan, config, the_plan, fingerprint, reg_scan, held_scan) -> dict:
    return {
        "config": config.as_dict(),
        "plan": the_plan.as_dict(),
        "dataset": {**spec.as_dict(), "images": len(scan.items), "fingerprint": fingerprint},
        "regularization": None if reg_scan is None else {
            "folder": str(reg_scan.folder), "images": len(reg_scan.items), "weight": config.regularization_weight,
            "repeats_per_image": the_plan.training_steps * config.batch_size * config.grad_accum / len(reg_scan.items),
        },
        "held_out": None if held_scan is None else {"folder": str(held_scan.folder), "images": len(held_scan.items)},
        "model": {"variant": resolved.variant.name, "format": resolved.format, "identity": resolved.identity},
        "history": TrainingHistory().as_dict(),
        "checkpoints": [],
        "final_lora": None,
    }


def _non_finite_message(step: int, collapse: CollapseReport | None, config: TrainConfig) -> str:
    """The LR advice first, then which checkpoint to keep: the collapse detector's last good one (as in the verdict),
    which may be earlier than the last saved one when the previews had already blown out."""
    last_good = collapse.last_good_path if collapse is not None else None
    kept = f"the last good checkpoint is {last_good}" if last_good else "no good checkpoint had been saved"
    return f"{non_finite_loss_message(step, config.learning_rate)} Training stopped; {kept}."


def _estimate_memory_mode(resolved: ResolvedModel, spec: DatasetSpec, scan: DatasetScan, config: TrainConfig, device, log) -> bool:
    """Log the VRAM/time estimate before step 1 and decide gradient checkpointing (automatic when ``None``)."""
    from .estimate import (
        decide_gradient_checkpointing,
        detect_gpu_memory,
        detect_gpu_name,
    )

    checkpointing, lines = decide_gradient_checkpointing(
        resolved.transformer_config, max(spec.resolutions), config.rank, config.gradient_checkpointing, config.base_8bit,
        gpu_memory_gib=detect_gpu_memory() if str(device).startswith("cuda") else None,
        batch_size=config.batch_size, grad_accum=config.grad_accum, images=len(scan.items),
        resolutions=len(spec.resolutions), training_steps=config.training_steps or 0, device_name=detect_gpu_name(),
    )
    for line in lines:
        log(line)
    return checkpointing
