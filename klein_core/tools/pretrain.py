"""``klein-lora make-tiny --pretrained``: a tiny Klein Base that draws, trained on a CPU from a seed.

The random tiny Klein (:mod:`.tiny`) proves formats and code paths but draws coloured noise, so a LoRA's effect can
only be measured in latent numbers. This one is pre-trained on the generated world of :mod:`.world`, with the same
classes and on-disk formats (and the same ComfyUI-detectable shape: head dim 128, 128 latent channels):

1. render the world: pictures of characters with their looks (the captions name the part colours);
2. fit a small ``AutoencoderKLFlux2`` to the pictures (reconstruction through the latent mode, which the sampler
   uses, with a term for the parts' flat colours: :func:`reconstruction_loss`), then
   set its batch-norm statistics from the latents, so normalised latents have unit variance as on Klein;
3. fit the part-colour reader (:mod:`.colour_reader`) that scores samples;
4. pre-train the ``Flux2Transformer2DModel`` as a text-to-image Base with the trainer's own flow-matching objective
   (:mod:`klein_core.train.objective`) and σ drawn where the sampler spends its steps (:func:`pretraining_sigmas`),
   captions dropped to ``""`` now and then so true CFG works; the text encoder stays the random tiny Qwen3 (its
   hidden states still tell the colour words apart);
5. measure: PSNR of decode(encode(x)) on held-out pictures, and the share of Base samples (50 sample steps, CFG 4)
   whose three part colours the reader finds as prompted;
6. write fp16 weights in the asked formats, the reader, and a manifest (seed, command, sha256 per file, figures).

The VAE and the transformer can train data parallel on ``processes`` single-threaded processes (one per core, torch's
``DistributedDataParallel``: :func:`data_parallel`): every process draws the whole batch from the same generators and
fits its share, the gradients are averaged, so the models are those of one process with the whole batch, up to float
rounding. Rounding is enough to change how well the transformer binds colours at half the shipped training steps;
the shipped base is the 2-process run's.

Everything draws from generators seeded from ``seed``: the same seed, process count, torch build and CPU instruction
set give the same bytes (torch picks its CPU kernels by instruction set: on an AVX2-only CPU the same command gave
another VAE and reader than an earlier recipe's shipped ones, 22.34 against 22.29 dB). A script that calls
:func:`pretrain_tiny` with more than one process needs the ``if __name__ == "__main__":`` guard of spawned processes.
The text is 32 tokens, a property of this model (its tokenizer's ``model_max_length``; Klein's is 512), because
the 512 padded tokens would be most of the cost at 64 px.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import atomic_write_bytes, atomic_write_json
from ..facts import exponential_shift, image_tokens, sampling_shift_mu
from ..model.text import klein_chat_text
from ..preset import PRESET
from ..train.distributed import DistributedContext, process_group
from .colour_reader import look_labels, part_accuracy, read_colours, save_reader, train_reader
from .tiny import SCHEDULER_CONFIG, TINY_TEXT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG, TOKENIZER_CORPUS
from .world import COLOUR_NAMES, world_sample

PRETRAINED_TEXT_TOKENS = 32  # every world caption is 31 tokens in the chat template
PRETRAINED_VAE_CONFIG = dict(
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    norm_num_groups=4,  # 4-8 channels per group: one channel per group would normalise each colour channel away
    latent_channels=32,
)
# the random tiny Klein's widths with one double and one single block: they bind the colours as well as two and two
# for half the FLOPs (at 6000 training steps 88% / 77% for seeds 0 and 1, against 96% / 79%)
PRETRAINED_TRANSFORMER_CONFIG = {**TINY_TRANSFORMER_CONFIG, "num_layers": 1, "num_single_layers": 1}
PRETRAINED_TOKENIZER_CORPUS = (
    TOKENIZER_CORPUS
    + " ".join(f"photo of a character with a {c} hat, a {c} scarf and a {c} body" for c in COLOUR_NAMES)
    + klein_chat_text("x")  # the chat template's own words ("assistant", "\n\n") as whole tokens, as in Qwen3's
)
READER_FILE = "reader.safetensors"
REGENERATE_FILE = "regenerate.sh"
MANIFEST_FILE = "manifest.json"
PRETRAIN_THREADS = 1  # per process: these ops are too small to split (2 threads in one process: 10-15% faster), and
# one thread gives the same bytes on any machine with the same torch build and CPU instruction set
PRETRAIN_PROCESSES = 2  # one per core of the 2-core budget, data parallel: the shipped base took 15.4 minutes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest on 64-bit: blocks up to 32 MiB come from the reusable heap
KEPT_FREE_HEAP = 1 << 30  # up to 1 GiB of freed heap stays with the process (a pre-training process peaks near 1 GB)
WORLD_SEED_OFFSET, HELD_OUT_SEED_OFFSET = 0, 1_000_003  # the held-out pictures come from another world seed


@dataclass(frozen=True)
class PretrainBudget:
    """How much pre-training; the goal is 15 minutes on 2 idle cores (the manifest records the seconds it took)."""

    resolution: int = 64
    world_images: int = 2400
    held_out_images: int = 96
    vae_training_steps: int = 4000  # at batch 8: 25.6 dB (2000 at LR 3e-3: 22.4 dB, and a transformer on its latents
    vae_batch_size: int = 8  # drew 17% of samples right against 92%); batch 8 learned more per second than 16
    vae_learning_rate: float = 2e-3
    reader_training_steps: int = 400
    transformer_training_steps: int = 6000  # at 3000, runs that differed in seed or float rounding drew 25-92%
    transformer_batch_size: int = 32
    transformer_learning_rate: float = 2e-3
    caption_dropout: float = 0.1
    colour_samples: int = 48
    sample_steps: int = PRESET.sample_steps
    cfg: float = PRESET.cfg


SMOKE_BUDGET = PretrainBudget(
    world_images=48,
    held_out_images=8,
    vae_training_steps=3,
    reader_training_steps=3,
    transformer_training_steps=3,
    colour_samples=4,
    sample_steps=2,
)


@dataclass
class PretrainResult:
    out_dir: Path
    manifest: dict
    components: tuple


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to the system.

    Every training step frees and allocates the same activations again. By default glibc returns big freed blocks
    to the system, and the next step pays a page fault for every 4 KiB it touches again: 700-1550 page faults per
    data-parallel training step, 0-34 with this, which makes the step 2.6-3.5% faster (``bench/pretrain_steps.py``).
    It holds for the rest of the process. No-op where the C library is not glibc (no ``mallopt``)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name (Windows), or no mallopt in it
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    mallopt(M_TRIM_THRESHOLD, KEPT_FREE_HEAP)


# --- the pictures ------------------------------------------------------------------------------------------------
def render_world(count: int, seed: int, size: int) -> tuple[torch.Tensor, list]:
    """``count`` world pictures as (N, 3, size, size) in [0, 1] and their looks."""
    pictures, looks = [], []
    for index in range(count):
        image, look = world_sample(index, seed, size)
        pictures.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
        looks.append(look)
    return torch.stack(pictures), looks


def _cosine_lr(optimizer: torch.optim.Optimizer, peak: float, step: int, total: int, warmup: int = 50) -> None:
    factor = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in optimizer.param_groups:
        group["lr"] = peak * factor


# --- the VAE -----------------------------------------------------------------------------------------------------
COLOUR_POOL = 4  # the colour term compares 4x4-pixel means: a part's flat colour, whatever its outline does


def reconstruction_loss(decoded: torch.Tensor, pictures: torch.Tensor) -> torch.Tensor:
    """MSE (what PSNR measures) + L1 (sharper outlines) + MSE of 4x4 means (the parts' colours).

    Plain MSE spends the first thousand VAE training steps on edges and shifts flat colours (on an earlier palette
    pink decoded as orange, purple as blue: the part-colour reader read 27% of its reconstructions right); with the
    colour term the same budget keeps the colours, so the transformer learns from latents that hold what the captions
    name."""
    error = decoded - pictures
    pooled = torch.nn.functional.avg_pool2d(error, COLOUR_POOL)
    return error.pow(2).mean() + 0.5 * error.abs().mean() + pooled.pow(2).mean()


def data_parallel(module: torch.nn.Module, dist: DistributedContext) -> torch.nn.Module:
    """``module`` wrapped in torch's ``DistributedDataParallel`` when there are several ranks, else itself.

    Each rank's loss is the mean over its equal share of the batch and DDP averages the gradients, so every rank
    takes the step of the whole batch's mean. DDP all-reduces gradient buckets while the backward pass still runs: on
    2 cores a transformer training step took 0.111 s against 0.137 s with one all-reduce after the backward pass (a
    whole-batch step in one process: 0.18 s)."""
    if not dist.is_distributed:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, forward_sync_buffers=False)


def optimizer_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    max_grad_norm: float | None = None,
) -> None:
    """Back-propagate ``loss`` (DDP averages the gradients over the ranks meanwhile), clip, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


class ThroughLatentMode(torch.nn.Module):
    """decode(encode(x)) through the latent mode as one ``forward`` (DDP syncs what runs through ``forward``)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pictures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.vae.encode(pictures).latent_dist.mode()
        return self.vae.decode(latents).sample, latents


def vae_loss(reconstruct: torch.nn.Module, pictures: torch.Tensor) -> torch.Tensor:
    """The VAE's training loss on ``pictures`` in [-1, 1] through ``reconstruct`` (:class:`ThroughLatentMode`, or
    DDP around it): :func:`reconstruction_loss` and a small pull of the latents towards 0, so that their scale does
    not drift while the decoder learns (:func:`set_latent_statistics` normalises them afterwards). The pre-training
    and ``bench/pretrain_steps.py`` both train with it."""
    decoded, latents = reconstruct(pictures)
    return reconstruction_loss(decoded, pictures) + 1e-4 * latents.pow(2).mean()


def fit_vae(
    pictures: torch.Tensor, budget: PretrainBudget, seed: int, log: Callable[[str], None], dist: DistributedContext
):
    """A small AutoencoderKLFlux2 fitted to reproduce the pictures through its latent mode (MSE on whole pictures:
    its mid-block attention sees the latent grid it will decode). Each rank draws the whole batch, fits its share."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**PRETRAINED_VAE_CONFIG)
    reconstruct = data_parallel(ThroughLatentMode(vae), dist)
    params = list(vae.parameters())
    optimizer = torch.optim.Adam(params, lr=budget.vae_learning_rate)
    generator = torch.Generator().manual_seed(seed)
    mine = dist.batch_slice(budget.vae_batch_size // dist.world_size)
    for step in range(budget.vae_training_steps):
        drawn = torch.randint(0, len(pictures), (budget.vae_batch_size,), generator=generator)
        batch = pictures[drawn[mine]] * 2 - 1
        _cosine_lr(optimizer, budget.vae_learning_rate, step, budget.vae_training_steps)
        loss = vae_loss(reconstruct, batch)
        optimizer_step(params, optimizer, loss)
        if (step + 1) % max(1, budget.vae_training_steps // 4) == 0:
            log(f"  VAE training step {step + 1}/{budget.vae_training_steps}, loss {dist.mean(loss):.4f}")
    return vae.eval()


@torch.no_grad()
def set_latent_statistics(vae, pictures: torch.Tensor) -> None:
    """Klein normalises patchified latents with the VAE's ``bn`` running stats: set them from the world's latents."""
    from ..model.latents import patchify

    latents = torch.cat([patchify(vae.encode(chunk * 2 - 1).latent_dist.mode()) for chunk in pictures.split(128)])
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


@torch.no_grad()
def reconstruction_psnr(vae, pictures: torch.Tensor) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of decode(encode(x)) through the latent mode."""
    from ..model.latents import decode_latents, encode_images

    decoded = torch.cat(
        [(decode_latents(vae, encode_images(vae, c * 2 - 1)) / 2 + 0.5).clamp(0, 1) for c in pictures.split(64)]
    )
    mse = (decoded - pictures).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


# --- the text ----------------------------------------------------------------------------------------------------
def build_text_side(seed: int):
    """The tokenizer (world words as whole tokens, 32-token text) and the random tiny Qwen3 text encoder."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .tiny import build_tokenizer

    tokenizer = build_tokenizer(PRETRAINED_TOKENIZER_CORPUS, text_tokens=PRETRAINED_TEXT_TOKENS)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), **TINY_TEXT_ENCODER_CONFIG)).eval()
    return tokenizer, text_encoder


def caption_embeddings(text_encoder, tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """Each caption's (L, 3H) embeddings through the pack's own prompt encoding; ``""`` included."""
    from ..model.text import encode_prompts

    texts = list(dict.fromkeys(["", *captions]))
    chunks = [encode_prompts(text_encoder, tokenizer, texts[i : i + 256]) for i in range(0, len(texts), 256)]
    return dict(zip(texts, torch.cat(chunks)))


# --- the transformer ---------------------------------------------------------------------------------------------
def pretraining_sigmas(batch: int, tokens: int, sample_steps: int, generator: torch.Generator) -> torch.Tensor:
    """σ for pre-training the Base: logit-normal, shifted with the sampler's μ (not the LoRA trainer's training μ).

    The caption decides the part colours at high σ, where the sampler spends its steps: at 16 image tokens and 50
    sample steps its shift is e^1.6, so 36% of the sample steps are at σ > 0.9, where the LoRA trainer's shift
    (e^0.46) draws 4% of its σ (this one: 27%). With the trainer's σ the loss at σ 0.95 hardly told the right caption
    from a wrong one (0.856 vs 0.866 after 2000 training steps); with this σ the gap was 9x larger after as many
    steps (0.79 vs 0.88). A LoRA trains on this Base with the trainer's own σ
    (:func:`klein_core.train.objective.sample_sigmas`)."""
    return exponential_shift(
        torch.sigmoid(torch.randn(batch, generator=generator)), sampling_shift_mu(tokens, sample_steps)
    )


def fit_transformer(
    latents: torch.Tensor,
    captions: list[str],
    embeds: dict[str, torch.Tensor],
    budget: PretrainBudget,
    seed: int,
    log: Callable[[str], None],
    dist: DistributedContext,
):
    """Pre-train a tiny Flux2 transformer as a text-to-image Base with the trainer's flow-matching objective. Each
    rank draws the whole batch (pictures, dropped captions, noise, σ) and computes the loss of its share."""
    from diffusers import Flux2Transformer2DModel

    from ..train.objective import flow_matching_loss

    torch.manual_seed(seed + 3)
    transformer = Flux2Transformer2DModel(**PRETRAINED_TRANSFORMER_CONFIG)
    model = data_parallel(transformer, dist)
    params = list(transformer.parameters())
    optimizer = torch.optim.AdamW(params, lr=budget.transformer_learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 4)
    caption_stack = torch.stack([embeds[c] for c in captions])
    tokens = image_tokens(latents.shape[-1] * 16, latents.shape[-2] * 16)
    transformer.train()
    mine = dist.batch_slice(budget.transformer_batch_size // dist.world_size)
    for step in range(budget.transformer_training_steps):
        batch = torch.randint(0, len(latents), (budget.transformer_batch_size,), generator=generator)
        dropped = torch.rand(len(batch), generator=generator) < budget.caption_dropout
        batch_embeds = torch.where(dropped[:, None, None], embeds[""][None], caption_stack[batch])
        x0 = latents[batch]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = pretraining_sigmas(len(batch), tokens, budget.sample_steps, generator)
        _cosine_lr(optimizer, budget.transformer_learning_rate, step, budget.transformer_training_steps)
        loss = flow_matching_loss(model, x0[mine], batch_embeds[mine], noise[mine], sigma[mine])
        optimizer_step(params, optimizer, loss, max_grad_norm=1.0)
        if (step + 1) % max(1, budget.transformer_training_steps // 6) == 0:
            whole_batch = dist.mean(loss)
            log(f"  transformer training step {step + 1}/{budget.transformer_training_steps}, loss {whole_batch:.4f}")
    return transformer.eval()


@torch.no_grad()
def sample_looks(
    transformer, vae, embeds: dict[str, torch.Tensor], looks: list, budget: PretrainBudget, seed: int
) -> torch.Tensor:
    """Base samples (50 sample steps, CFG 4 by default) of each look's caption: (N, 3, H, W) in [0, 1]."""
    from ..preview.sampling import denoise_base, latents_to_images

    prompt = torch.stack([embeds[look.caption()] for look in looks])
    latents = denoise_base(
        transformer, prompt, embeds[""], budget.resolution, budget.resolution, budget.sample_steps, budget.cfg, seed
    )
    return latents_to_images(vae, latents)


def colour_accuracy(reader, transformer, vae, embeds, looks: list, budget: PretrainBudget, seed: int) -> dict:
    """The share of samples whose three part colours the reader finds as the caption asked."""
    samples = sample_looks(transformer, vae, embeds, looks, budget, seed)
    accuracy = part_accuracy(read_colours(reader, samples), look_labels(looks))
    return {**accuracy, "samples": len(looks), "sample_steps": budget.sample_steps, "cfg": budget.cfg, "seed": seed}


# --- the whole command ---------------------------------------------------------------------------------------------
def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the manifest, by POSIX path relative to it."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def _write_model(out: Path, components: tuple, reader, fmt: str) -> None:
    """fp16 weights in the asked formats (the same writers as the random tiny Klein) and the reader."""
    from .tiny import write_comfy, write_diffusers

    halves = tuple(c.half() if isinstance(c, torch.nn.Module) else c for c in components)
    if fmt in ("diffusers", "both"):
        write_diffusers(out / "diffusers", halves, distilled=False)
    if fmt in ("comfyui", "both"):
        write_comfy(out / "comfyui", halves, distilled=False)
    save_reader(reader, out / READER_FILE)
    for module in halves:
        if isinstance(module, torch.nn.Module):
            module.float()


def pretrain_tiny(
    out: str | Path,
    budget: PretrainBudget = PretrainBudget(),
    seed: int = 0,
    fmt: str = "both",
    command: str = "",
    log: Callable[[str], None] = print,
    processes: int = PRETRAIN_PROCESSES,
) -> PretrainResult:
    """Pre-train the tiny Klein into ``out`` (``diffusers/``, ``comfyui/``, reader, manifest, regenerate.sh) on
    ``processes`` single-threaded processes (data parallel; the bytes depend on the count, the manifest records it).

    ``out`` must be new, empty, or a previous output (it has a manifest): nothing else is ever overwritten."""
    from ..errors import KleinError

    if fmt not in ("diffusers", "comfyui", "both"):
        raise KleinError(f"format must be diffusers, comfyui or both, got {fmt!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise KleinError(f"{out} is not empty and holds no earlier tiny Klein ({MANIFEST_FILE}): give a new folder")
    batches = (budget.vae_batch_size, budget.transformer_batch_size)
    if processes < 1 or any(batch % processes for batch in batches):
        raise KleinError(f"processes must be 1 or more and divide the batch sizes {batches}, got {processes}")
    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    keep_freed_memory()
    try:
        if processes == 1:
            return _pretrain(out, budget, seed, fmt, command, log, DistributedContext())
        return _pretrain_in_processes(out, budget, seed, fmt, command, log, processes)
    finally:
        torch.set_num_threads(threads)


def _pretrain_in_processes(
    out: Path, budget: PretrainBudget, seed: int, fmt: str, command: str, log, processes: int
) -> PretrainResult:
    """Rank 0 here, ranks 1.. in spawned processes that run the same seeded recipe and write nothing; they meet in a
    gloo group through a file in a temporary folder. A rank that fails stops the others at their next all-reduce."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="klein-pretrain-") as meeting:
        init_method = (Path(meeting) / "rendezvous").as_uri()
        spawn = mp.get_context("spawn")
        helpers = [
            spawn.Process(target=_helper_rank, args=(rank, processes, init_method, budget, seed), daemon=True)
            for rank in range(1, processes)
        ]
        for helper in helpers:
            helper.start()
        dist = DistributedContext(0, processes)
        try:
            with process_group(dist, "cpu", init_method):
                return _pretrain(out, budget, seed, fmt, command, log, dist)
        finally:
            if torch.distributed.is_initialized():  # left behind by a failed peer: gloo tears down cleanly
                torch.distributed.destroy_process_group()
            for helper in helpers:
                helper.join(timeout=60)
                if helper.is_alive():
                    helper.terminate()


def _helper_rank(rank: int, processes: int, init_method: str, budget: PretrainBudget, seed: int) -> None:
    """A spawned rank: the same fits on its share of every batch; rank 0 measures and writes."""
    torch.set_num_threads(PRETRAIN_THREADS)
    keep_freed_memory()
    dist = DistributedContext(rank, processes)
    with process_group(dist, "cpu", init_method):
        _pretrain(None, budget, seed, "", "", lambda _message: None, dist)


def _pretrain(
    out: Path | None, budget: PretrainBudget, seed: int, fmt: str, command: str, log, dist: DistributedContext
) -> PretrainResult | None:
    """The recipe on one rank. Every rank renders the same world and fits the VAE and the transformer on its share of
    each batch, so their models stay equal; rank 0 alone measures, fits the reader and writes (others return None)."""
    from ..model.latents import encode_images

    started, seconds = time.perf_counter(), {}

    def lap(name: str) -> None:
        seconds[name] = round(time.perf_counter() - started - sum(seconds.values()), 1)

    size = budget.resolution
    pictures, looks = render_world(budget.world_images, seed + WORLD_SEED_OFFSET, size)
    held_pictures, held_looks = render_world(budget.held_out_images, seed + HELD_OUT_SEED_OFFSET, size)
    log(f"rendered {len(pictures)} world pictures and {len(held_pictures)} held-out ones at {size} px")
    vae = fit_vae(pictures, budget, seed, log, dist)
    set_latent_statistics(vae, pictures)
    if dist.is_main:
        psnr = reconstruction_psnr(vae, held_pictures)
        log(f"VAE: PSNR {psnr:.1f} dB on held-out pictures")
        lap("vae")
        reader = train_reader(pictures, look_labels(looks), seed + 5, budget.reader_training_steps)
        reader_accuracy = part_accuracy(read_colours(reader, held_pictures), look_labels(held_looks))
        log(f"part-colour reader: {100 * reader_accuracy['all_parts']:.0f}% of held-out pictures read right")
        lap("reader")
    tokenizer, text_encoder = build_text_side(seed)
    evaluated = held_looks[: budget.colour_samples]
    embeds = caption_embeddings(text_encoder, tokenizer, [look.caption() for look in looks + evaluated])
    latents = torch.cat([encode_images(vae, chunk * 2 - 1) for chunk in pictures.split(128)])
    transformer = fit_transformer(latents, [look.caption() for look in looks], embeds, budget, seed, log, dist)
    if not dist.is_main:
        return None
    lap("transformer")
    accuracy = colour_accuracy(reader, transformer, vae, embeds, evaluated, budget, PRESET.preview_seed)
    log(
        f"samples ({budget.sample_steps} sample steps, CFG {budget.cfg:g}): {100 * accuracy['all_parts']:.0f}% with "
        f"all three part colours right, {100 * accuracy['parts']:.0f}% of parts"
    )
    lap("evaluation")
    manifest = {
        "seed": seed,
        "command": command,
        "budget": asdict(budget),
        "torch": torch.__version__,
        "processes": dist.world_size,
        "threads": PRETRAIN_THREADS,
        "psnr_db": round(psnr, 2),
        "colour_accuracy": accuracy,
        "reader_accuracy_held_out": reader_accuracy,
        "seconds": seconds,
    }
    return _write_outputs(out, (transformer, vae, text_encoder, tokenizer), reader, fmt, manifest)


def _write_outputs(out: Path, models: tuple, reader, fmt: str, manifest: dict) -> PretrainResult:
    """The weights in the asked formats, the reader, ``regenerate.sh`` and the manifest (with each file's sha256)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    components = (*models, FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    _write_model(out, components, reader, fmt)
    atomic_write_bytes(
        out / REGENERATE_FILE,
        (
            "#!/bin/sh\n# Rebuilds this folder from the repository root (same bytes with the same torch build).\n"
            f"{manifest['command']}\n"
        ).encode(),
    )
    atomic_write_json(out / MANIFEST_FILE, {**manifest, "files": file_hashes(out)})
    return PretrainResult(out, manifest, components)


# --- the shipped copy ----------------------------------------------------------------------------------------------
SHIPPED_FOLDER = Path(__file__).resolve().parent.parent / "assets" / "tiny_klein_drawn"
REGENERATE_COMMAND = "klein-lora make-tiny --pretrained --out klein_core/assets/tiny_klein_drawn --seed 0"


def shipped_tiny() -> Path:
    """The pre-trained tiny Klein that ships with the pack (``diffusers/``, ``comfyui/``, reader, manifest)."""
    from ..errors import ModelError

    if not (SHIPPED_FOLDER / MANIFEST_FILE).is_file():
        raise ModelError(
            f"the pre-trained tiny Klein is missing from {SHIPPED_FOLDER} (a broken install?); "
            f"rebuild it from a source checkout with: {REGENERATE_COMMAND}"
        )
    return SHIPPED_FOLDER
