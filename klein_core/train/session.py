"""One training run's working set, built once: encoded data, the adapted transformer, optimizer and scheduler, the
samplers and the health monitor; and what the loop asks of it: the micro-batches of a training step, an optimizer
update, a checkpoint, the resume state, and the run as it ends (finished, stopped, or non-finite)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import atomic_torch_save, atomic_write_json
from ..crashpoint import crash_point
from ..data.buckets import BucketBatchSampler
from ..data.cache import EmbeddingCache, latent_requests, prompts_to_cache
from ..data.images import load_image_rgb
from ..data.scan import DatasetScan
from ..data.spec import DatasetSpec
from ..errors import NonFiniteLoss
from ..health.advice import non_finite_loss_message
from ..health.collapse import CollapseReport
from ..health.history import TrainingHistory
from ..health.monitor import HealthMonitor
from ..model import lora as lora_io
from ..model.latents import encode_images
from ..model.loading import ResolvedModel, load_text_encoder, load_transformer, load_vae, model_dtype
from ..model.text import encode_prompts
from ..facts import PIXEL_MULTIPLE
from ..preset import PRESET
from .config import SavedCheckpoint, TrainConfig, TrainedRun
from .distributed import DistributedContext
from .objective import MicroBatch, micro_batch_generator, sample_sigmas, validation_loss, validation_subset
from .planner import Plan
from .preflight import Preflight, regularization_repeats, regularization_summary
from .resume import MANIFEST_FILE, STATE_FILE, ResumePoint


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
            loaded.append(load_text_encoder(resolved, dtype=model_dtype(device), device=device))
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
        latents = cache.get_or_compute_latents(
            latent_requests(scan), lambda pixels: encode_images(vae, pixels.to(device))
        )
        samples = scan.samples()
        encoded.append(
            EncodedDataset(
                latents=[latent.to(device) for latent in latents],
                captions=[scan.items[s.item_index].caption for s in samples],
                embeds=embeds,
                sample_buckets=[(s.resolution, tuple(s.bucket)) for s in samples],
                text_encoder_calls=cache.stats.text_misses,
                vae_encoder_calls=cache.stats.latent_misses,
            )
        )
    return encoded, vae


def checkpoint_name(output_name: str, training_step: int) -> str:
    return f"{output_name}_step{training_step:06d}.safetensors"


def adapt_transformer(transformer: torch.nn.Module, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze the base, apply the memory mode, add the LoRA (its initial A matrices depend on the seed alone) and
    return the trainable parameters. The fit-check audit runs this same function on a fake 9B."""
    transformer.requires_grad_(False)
    if config.gradient_checkpointing:
        from ..model.lowvram import enable_block_checkpointing

        enable_block_checkpointing(transformer, config.checkpointed_blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        lora_io.add_lora(transformer, config.rank, config.alpha)
    if config.compile_blocks:
        for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
            block.compile()  # in place: parameter names (and so LoRA keys) are unchanged
    return lora_io.lora_parameters(transformer)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, device):
    """AdamW (fused on CUDA) with a linear warmup over ``warmup_steps`` training steps."""
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=str(device).startswith("cuda")
    )
    return optimizer, warmup_scheduler(optimizer, config.warmup_steps)


def warmup_scheduler(optimizer, warmup_steps: int):
    """The LR rises linearly over the first ``warmup_steps`` training steps, then stays."""
    warmup = max(0, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler) -> None:
    """One update: step, advance the LR schedule, free the gradients (``set_to_none``: no zeroed copies kept)."""
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Progress:
    """Where the loop is: the training steps done and the losses not yet read back from the device."""

    step: int
    pending: list[torch.Tensor] = field(default_factory=list)


class TrainingSession:
    """The working set of one run. Rank 0 writes every file; all ranks compute."""

    def __init__(
        self,
        resolved: ResolvedModel,
        pre: Preflight,
        run_dir: Path,
        cache_dir,
        device,
        dist: DistributedContext,
        log: Callable[[str], None],
        on_checkpoint=None,
    ) -> None:
        self.resolved, self.pre, self.config, self.spec, self.scan = resolved, pre, pre.config, pre.spec, pre.scan
        self.run_dir, self.device, self.dist, self.log, self.on_checkpoint = run_dir, device, dist, log, on_checkpoint
        if not dist.is_main:
            dist.barrier()  # rank 0 fills the cache first: the others find every entry, no second text encoder
        encoded, self.vae = encode_datasets(resolved, pre.datasets(), pre.prompts, cache_dir, device, log)
        if dist.is_main:
            dist.barrier()
        extra = iter(encoded[1:])
        self.data = encoded[0]
        self.reg_data = next(extra) if pre.reg_scan is not None else None
        self.held_data = next(extra) if pre.held_scan is not None else None
        self.transformer = self._load_transformer()
        self.optimizer, self.scheduler = make_optimizer(
            adapt_transformer(self.transformer, self.config), self.config, device
        )
        self.sampler = self._sampler(self.data, self.config.seed)
        self.reg_sampler = self._sampler(self.reg_data, self.config.seed + 1) if self.reg_data is not None else None
        self.dropout = self.spec.dropout(self.config.seed)
        with_preview = self.config.health_previews and bool(pre.prompts)
        self.monitor = HealthMonitor(
            self.config.learning_rate,
            self.config.rank,
            has_regularization=self.reg_data is not None,
            preview=_health_preview(self.transformer, self.vae, self.data, pre.prompts, self.spec, self.config)
            if with_preview
            else None,
            references=[_reference_image(item) for item in self.scan.items] if with_preview else None,
        )
        self.manifest = _new_manifest(resolved, pre, cache_dir)

    def _load_transformer(self) -> torch.nn.Module:
        # The 8-bit base loads on the CPU and reaches the device block by block, already quantised.
        transformer = load_transformer(
            self.resolved, dtype=model_dtype(self.device), device="cpu" if self.config.base_8bit else self.device
        )
        if self.config.base_8bit:
            from ..model.lowvram import quantize_base_8bit

            self.log(f"8-bit base: block weights quantised to int8 with {quantize_base_8bit(transformer, self.device)}")
        return transformer

    def _sampler(self, data: EncodedDataset, seed: int) -> BucketBatchSampler:
        """Global batches (per-process batch x world size): every rank draws the same one and trains its slice."""
        return BucketBatchSampler(data.sample_buckets, self.pre.plan.batch_size, seed=seed)

    # --- start: resume, or the step-0 baseline ----------------------------------------------------------------------
    def start(self) -> Progress:
        """Restore where a resumed run continues (resume.py), or record the untrained base (the baseline of validation
        loss and previews). run.json is written at once: a run killed before its first checkpoint can be resumed."""
        point = self.pre.resume
        if point is None or point.kind == "start":
            if self.dist.is_main:
                self.monitor.record_checkpoint(0, None, *self.checkpoint_losses())
                self._write_manifest()
            return Progress(0)
        lora_io.load_adapter_weights(self.transformer, point.lora)
        if point.state is not None:
            self.optimizer.load_state_dict(point.state["optimizer"])
            self.scheduler.load_state_dict(point.state["scheduler"])
            torch.set_rng_state(point.state["torch_rng"])
        else:  # Adam's moments restart at zero: a short warmup keeps the first updates small
            self.scheduler = warmup_scheduler(self.optimizer, point.warmup_steps)
        self._set_learning_rate(self.config.learning_rate)  # a changed LR (--allow-changes) takes effect
        self.monitor.history = TrainingHistory.from_dict(point.history)  # what happened; the config is today's
        self.manifest["resumed_from"] = point.as_dict()
        if self.pre.lineage and Path(self.pre.lineage["parent_run"]) != self.run_dir.resolve():
            for record in self.monitor.history.checkpoints:  # the parent's files stay the parent's (never pruned here)
                record.lora_path = None
        how = (
            "its optimizer state"
            if point.state is not None
            else f"a fresh optimizer ({point.warmup_steps}-step warmup)"
        )
        self.log(f"resuming {self.run_dir} at training step {point.step}/{self.config.training_steps} with {how}")
        if self.dist.is_main and point.source.parent.resolve() == self.run_dir.resolve():
            self._complete_checkpoint(point)
        return Progress(point.step)

    def _complete_checkpoint(self, point: ResumePoint) -> None:
        """A kill after the state was written may have cut off the checkpoint's LoRA file or its health work: the
        state holds the same adapter, so both are redone exactly as the unbroken run did them."""
        path = self.run_dir / checkpoint_name(self.config.output_name, point.step)
        record = self.monitor.history.checkpoint_at(point.step)
        if record is None or record.lora_path is None:
            if point.state is not None:
                return  # a stop or final step with no checkpoint record: nothing was cut off
            path, record = point.source, self.monitor.history.add_checkpoint(point.step, str(point.source))
        if not Path(record.lora_path).exists():
            lora_io.save_lora(path, point.lora, self.lora_metadata(point.step))
            self.log(f"wrote {path.name}: the kill came before its LoRA file")
        if record.validation_loss is None:
            self.log(f"health work of the checkpoint at training step {point.step} (cut off or skipped)")
            self._checkpoint_health(point.step, Path(record.lora_path))
        self._write_manifest()

    def _set_learning_rate(self, learning_rate: float) -> None:
        """Loading a saved optimizer and scheduler restores the LR the run started with; a resume that lowers the LR
        (the first fix for a collapse) must train at the new one, at the same point of the warmup."""
        self.scheduler.base_lrs = [learning_rate for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = learning_rate
            group["lr"] = learning_rate * factor

    # --- one training step ---------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's slices of the G global micro-batches of a training step: the samples, their noise, σ and
        caption dropout are a function of (seed, training step, micro-batch, position in the global batch) alone,
        so N processes train what one process with the global batch trains. A rank whose slice of a short last
        batch is empty gets no micro-batch there."""
        out = []
        part = self.dist.batch_slice(self.config.batch_size)
        for micro in range(self.config.grad_accum):
            position = step * self.config.grad_accum + micro
            generator = micro_batch_generator(self.config.seed, step, micro)
            epoch, batch = self.sampler.batch_at(position)
            drop = self.dropout.caption_for
            captions = [drop(self.data.captions[i], self.scan.trigger, epoch, i) for i in batch[part]]
            identity = _micro_batch(self.data, batch, part, captions, generator, self.device)
            out += [identity] if identity is not None else []
            if self.reg_sampler is not None:
                _, reg_batch = self.reg_sampler.batch_at(position)
                reg_captions = [self.reg_data.captions[i] for i in reg_batch[part]]
                reg = _micro_batch(self.reg_data, reg_batch, part, reg_captions, generator, self.device)
                if reg is not None:
                    weight = self.config.regularization_weight * reg.weight
                    out.append(replace(reg, weight=weight, is_regularization=True))
        return out

    def optimizer_step(self) -> None:
        optimizer_step(self.optimizer, self.scheduler)

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint_losses(self) -> tuple[float, float | None]:
        """The fixed-noise validation loss on a fixed subset of the training images (the same at every checkpoint),
        and on all held-out images when there are some."""
        subset = validation_subset(len(self.data.latents), self.config.validation_images)
        trained = validation_loss(self.transformer, self.data.latents, _caption_embeds(self.data), subset)
        if self.held_data is None:
            return trained, None
        return trained, validation_loss(self.transformer, self.held_data.latents, _caption_embeds(self.held_data))

    def record_validation(self, step: int) -> None:
        """An extra validation between checkpoints (``validation_every``): losses only, no LoRA file."""
        if self.dist.is_main:
            trained, held = self.checkpoint_losses()
            self.monitor.history.add_checkpoint(step, None, trained, held_out_loss=held)

    def save_checkpoint(self, step: int, with_health: bool = True) -> Path:
        """The resume state first, then the LoRA file and run.json, and only then the health work (validation pass,
        preview: tens of seconds on a real card) and run.json again. Each write is atomic, so a kill at any moment
        leaves a state at least as new as the newest checkpoint file: the run resumes exactly (resume.py)."""
        path = self.run_dir / checkpoint_name(self.config.output_name, step)
        weights = lora_io.adapter_weights(self.transformer)
        if self.dist.is_main:
            self.monitor.history.add_checkpoint(step, str(path))
            pruned = _prune(self.monitor.history, self.config.keep_last)
            atomic_torch_save(self.state(step, weights), self.run_dir / STATE_FILE)
            crash_point(f"state@{step}")
            lora_io.save_lora(path, weights, self.lora_metadata(step))
            for old in pruned:
                old.unlink(missing_ok=True)
            self._write_manifest()
        if with_health:
            self._checkpoint_health(step, path)
        if self.dist.is_main and self.on_checkpoint:
            self.on_checkpoint(self.monitor.history.checkpoint_at(step))
        return path

    def _checkpoint_health(self, step: int, path: Path) -> None:
        """Validation losses, the health preview and the record: rank 0's work (the others go on to the next step's
        all-reduce and wait there)."""
        if self.dist.is_main:
            losses = self.checkpoint_losses()
            crash_point(f"health@{step}")
            self.monitor.record_checkpoint(step, str(path), *losses, with_preview=self.previews_at(step))
            self._write_manifest()

    def previews_at(self, step: int) -> bool:
        """Whether the checkpoint at ``step`` renders a health preview: every ``health_preview_every``-th one, and
        always the final one (a function of the step alone, so a resumed run previews the same checkpoints)."""
        config = self.config  # preflight has set the planned training steps and health_preview_every
        if step >= config.training_steps or not config.save_every:
            return True
        return (step // config.save_every) % config.health_preview_every == 0

    def _synced_manifest(self) -> dict:
        self.manifest["history"] = self.monitor.history.as_dict()
        self.manifest["checkpoints"] = [str(c.lora_path) for c in self.monitor.history.checkpoints if c.lora_path]
        return self.manifest

    def _write_manifest(self) -> None:
        atomic_write_json(self.run_dir / MANIFEST_FILE, self._synced_manifest())

    def state(self, step: int, weights: lora_io.LoraWeights) -> dict:
        """What ``--resume`` restores: adapter, optimizer, scheduler, RNG, and the run's config and history."""
        return {
            "training_step": step,
            "lora": weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": self.config.as_dict(),
            "fingerprint": self.pre.fingerprint,
            "world_size": self.dist.world_size,
            "manifest": self._synced_manifest(),
        }

    def lora_metadata(self, step: int) -> dict:
        return _lora_metadata(self.spec, self.config, self.pre.plan, step, self.resolved, self.dist.world_size)

    # --- the end: finished, stopped, or non-finite -----------------------------------------------------------------
    def finish(self, step: int) -> TrainedRun:
        """The final LoRA, the health verdict and best checkpoint, and the in-memory run for previews."""
        final_path = self.run_dir / f"{self.config.output_name}.safetensors"
        if self.monitor.history.checkpoint_at(step) is None:
            self.save_checkpoint(step)
        summary = None
        if self.dist.is_main:
            lora_io.save_lora(final_path, lora_io.adapter_weights(self.transformer), self.lora_metadata(step))
            summary = self.monitor.finish(self.run_dir, self.config.output_name)
            self.manifest.update(
                final_lora=str(final_path), history=self.monitor.history.as_dict(), health=summary.as_dict()
            )
            atomic_write_json(self.run_dir / MANIFEST_FILE, self.manifest)
            self.log(summary.verdict)
        lora_io.remove_lora(self.transformer)
        self.transformer.eval()
        kept = [
            SavedCheckpoint(c.step, Path(c.lora_path), lora_io.read_lora_file(c.lora_path))
            for c in self.monitor.history.checkpoints
            if c.lora_path and Path(c.lora_path).exists()
        ]
        return TrainedRun(
            transformer=self.transformer,
            vae=self.vae,
            checkpoints=kept,
            preview_embeds={p: self.data.embeds[p] for p in (*self.pre.prompts, "")},
            trigger=self.scan.trigger,
            resolution=self.spec.resolutions[0],
            run_dir=self.run_dir,
            final_lora=final_path,
            plan=self.pre.plan,
            manifest=self.manifest,
            history=self.monitor.history,
            health=summary,
            regularization=self._regularization_line(),
        )

    def _regularization_line(self) -> str | None:
        reg_scan = self.pre.reg_scan
        if reg_scan is None:
            return None
        images = len(reg_scan.items)
        repeats = regularization_repeats(self.pre.plan, self.config, images)
        return regularization_summary(images, self.config.regularization_weight, repeats)

    def explain_non_finite(self, exc: NonFiniteLoss) -> None:
        """A collapse: write the verdict, advice, best (last good) checkpoint and report, and put the same last good
        checkpoint in the error's message."""
        if self.dist.is_main:
            exc.health = self.monitor.finish(self.run_dir, self.config.output_name)
            self.manifest.update(history=self.monitor.history.as_dict(), health=exc.health.as_dict())
            atomic_write_json(self.run_dir / MANIFEST_FILE, self.manifest)
            self.log(exc.health.verdict)
        collapse = exc.health.collapse if exc.health else self.monitor.check()
        exc.args = (_non_finite_message(exc.training_step, collapse if self.dist.is_main else None, self.config),)

    def save_on_stop(self, progress: Progress, start_step: int) -> str:
        """On cancel or error: save the last completed training step (if new) and say where."""
        step, config = progress.step, self.config
        saved = [c.lora_path for c in self.monitor.history.checkpoints if c.lora_path]
        last = f"last checkpoint: {saved[-1] if saved else 'none yet'}"
        if progress.pending:
            values = torch.stack(progress.pending).tolist()
            self.monitor.record_losses(step - len(values) + 1, values)
            bad = [step - len(values) + 1 + i for i, v in enumerate(values) if not math.isfinite(v)]
            if bad:  # never save weights a non-finite loss has touched
                return (
                    f"training stopped at training step {step}/{config.training_steps}; the loss had gone "
                    f"non-finite at training step {bad[0]}, so nothing was saved; {last}"
                )
        if step > start_step and self.dist.is_main and self.monitor.history.checkpoint_at(step) is None:
            saved_path = self.save_checkpoint(step, with_health=False)
            return (
                f"training stopped at training step {step}/{config.training_steps}; saved {saved_path} "
                f"(resume with --resume, run folder {self.run_dir})"
            )
        return f"training stopped at training step {step}/{config.training_steps}; {last}"


def _micro_batch(
    data: EncodedDataset, batch: list[int], part: slice, captions: list[str], generator: torch.Generator, device
) -> MicroBatch | None:
    """The ``part`` of a global micro-batch this rank trains, weighted by its share of the global batch (its loss
    sums with the other ranks' to the global mean). The noise and σ of the whole global batch are drawn, so each
    sample's are the same whatever the world size."""
    shape = (len(batch), *data.latents[batch[0]].shape)
    noise = torch.randn(shape, generator=generator)
    sigma = sample_sigmas(len(batch), shape[-1] * shape[-2], generator)
    mine = batch[part]
    if not mine:
        return None
    latents = torch.stack([data.latents[i] for i in mine])
    noise, sigma = _host_to_device(noise[part], device).to(latents.dtype), _host_to_device(sigma[part], device)
    embeds = torch.stack([data.embeds[c] for c in captions])
    return MicroBatch(latents, embeds, noise, sigma, weight=1.0 if len(mine) == len(batch) else len(mine) / len(batch))


def _host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Noise and σ are drawn on the CPU (same numbers on every device). On CUDA they go through pinned memory with a
    non-blocking copy: a pageable copy would make the host wait for the previous training step's kernels each step."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _caption_embeds(data: EncodedDataset) -> list[torch.Tensor]:
    return [data.embeds[c].unsqueeze(0) for c in data.captions]


def _reference_image(item) -> np.ndarray:
    """A training image as (H, W, 3) floats for likeness scoring (at most 512 px on its long side)."""
    image = load_image_rgb(item.path)
    image.thumbnail((512, 512))
    return np.asarray(image, dtype=np.float32) / 255.0


def _health_preview(
    transformer, vae, data: EncodedDataset, prompts: tuple[str, ...], spec: DatasetSpec, config: TrainConfig
):
    """The first preview prompt rendered Base-correctly with the current adapter (for preview stats and likeness)."""
    from ..preview.sampling import sample_base

    size = health_preview_size(spec.resolutions[0], config)

    def render() -> torch.Tensor:
        was_training = transformer.training
        transformer.eval()
        try:
            images = sample_base(
                transformer,
                vae,
                data.embeds[prompts[0]],
                data.embeds[""],
                size,
                size,
                sample_steps=config.health_sample_steps,
                seed=PRESET.preview_seed,
            )
        finally:
            transformer.train(was_training)
        return images.permute(0, 2, 3, 1)  # (B, H, W, 3)

    return render


def health_preview_size(resolution: int, config: TrainConfig) -> int:
    """The health preview's side: the training resolution, capped at ``health_preview_resolution`` (a multiple of
    16, as every Klein image side)."""
    capped = min(resolution, config.health_preview_resolution)
    return max(PIXEL_MULTIPLE, capped - capped % PIXEL_MULTIPLE)


def _prune(history: TrainingHistory, keep_last: int) -> list[Path]:
    """Mark the oldest step checkpoints beyond ``keep_last`` unsaved (their health records stay) and return their
    files, deleted once the new checkpoint is on disk."""
    if keep_last <= 0:
        return []
    saved = [c for c in history.checkpoints if c.lora_path]
    pruned = [Path(record.lora_path) for record in saved[:-keep_last]]
    for record in saved[:-keep_last]:
        record.lora_path = None
    return pruned


def _lora_metadata(
    spec: DatasetSpec, config: TrainConfig, the_plan: Plan, step: int, resolved: ResolvedModel, world_size: int
) -> dict:
    return {
        "trigger_word": spec.trigger,
        "rank": config.rank,
        "alpha": config.alpha if config.alpha is not None else config.rank,
        "training_steps": step,
        "repeats_per_image": f"{step * the_plan.batch_size * config.grad_accum / the_plan.images:.2f}",
        "batch_size": config.batch_size,
        "global_batch_size": the_plan.batch_size,
        "world_size": world_size,
        "base_model": f"FLUX.2 [klein] Base {resolved.variant.name}",
        "resolution": ",".join(str(r) for r in spec.resolutions),
    }


def _new_manifest(resolved: ResolvedModel, pre: Preflight, cache_dir) -> dict:
    """The run as configured: enough for ``klein-lora train --resume RUN`` to continue it with no other argument."""
    config, reg_scan, held_scan = pre.config, pre.reg_scan, pre.held_scan
    return {
        "config": config.as_dict(),
        "plan": pre.plan.as_dict(),
        "global_batch_size": pre.plan.batch_size,
        "world_size": pre.world_size,
        "dataset": {**pre.spec.as_dict(), "images": len(pre.scan.items), "fingerprint": pre.fingerprint},
        "regularization": None
        if reg_scan is None
        else {
            "folder": str(reg_scan.folder),
            "images": len(reg_scan.items),
            "weight": config.regularization_weight,
            "repeats_per_image": regularization_repeats(pre.plan, config, len(reg_scan.items)),
            "spec": pre.regularization.as_dict(),
        },
        "held_out": None
        if held_scan is None
        else {"folder": str(held_scan.folder), "images": len(held_scan.items), "spec": pre.held_out.as_dict()},
        "model": {
            "variant": resolved.variant.name,
            "format": resolved.format,
            "identity": resolved.identity,
            "source": resolved.source_args(),
        },
        "preview_prompts": list(pre.prompts),
        "lineage": pre.lineage,
        "cache_dir": None if cache_dir is None else str(cache_dir),
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
