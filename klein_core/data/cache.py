"""On-disk cache of VAE latents and text embeddings, so the text encoder and VAE run once per input, ever.

Why: Qwen3-8B (~16 GB bf16) must not sit beside the 9B transformer while training, and encoding costs ~8 TFLOP per
caption. The trainer encodes everything it needs up front through this cache, then frees the encoders; a second run
on an unchanged dataset finds every entry and never calls an encoder.

* **Keys** are sha256 over a canonical JSON of exactly the inputs that determine the value:
  latents: image-bytes sha256, bucket (width, height), model identity; text: the prompt text, model identity.
  Both include ``CACHE_FORMAT_VERSION`` (bumped when preprocessing changes). Change any input and the key changes;
  change nothing and it is found again.
* **Storage**: ``<cache_dir>/{latents,text}/<key[:2]>/<key>.safetensors``, one tensor ``value`` per file plus
  metadata naming its inputs; every write is atomic (temporary file, then rename), so concurrent or interrupted runs
  leave whole entries or none. An unreadable or mismatching entry is recomputed and replaced.
* **Encoders** are callables the trainer supplies (``encode_fn``); they run under ``torch.no_grad()`` on batches of
  misses only. Latents: ``encode_fn(pixels)`` with pixels float32 (B, 3, H, W) in [-1, 1], all of one bucket, returns
  (B, …). Text: ``encode_fn(prompts)`` with a list of strings returns (B, …). Values are stored on CPU in the dtype
  the encoder returned.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..atomic import atomic_save_safetensors
from ..errors import KleinError
from .buckets import Bucket
from .captions import substitute_trigger
from .scan import DatasetScan, ScanItem, bucket_pixels
from .spec import DatasetSpec

if TYPE_CHECKING:
    import torch

CACHE_FORMAT_VERSION = "1"
CACHE_ENV_VAR = "KLEIN_LORA_CACHE"
_TENSOR_NAME = "value"


def default_cache_dir() -> Path:
    """``$KLEIN_LORA_CACHE``, else ``$XDG_CACHE_HOME/klein-lora``, else ``~/.cache/klein-lora`` (headless use)."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "klein-lora"


class CacheError(KleinError):
    """An encoder returned something the cache cannot store (wrong batch size, not a tensor)."""


@dataclass(frozen=True)
class LatentRequest:
    """One latent to get: an image of the scan at one bucket."""

    item: ScanItem
    bucket: Bucket


def latent_requests(scan: DatasetScan) -> list[LatentRequest]:
    """A request for every training sample of a scan (each image at each resolution), in ``scan.samples()`` order."""
    return [LatentRequest(scan.items[s.item_index], s.bucket) for s in scan.samples()]


def prompts_to_cache(scan: DatasetScan, spec: DatasetSpec, preview_prompts: Sequence[str] = ()) -> list[str]:
    """Every text a run needs, once each: the captions, the dropped caption (if dropout is on), the empty negative
    and the preview prompts.

    Preview prompts get ``[trigger]`` substituted. The empty prompt is always included: it is the CFG negative.
    """
    texts = [item.caption for item in scan.items]
    if spec.caption_dropout > 0:
        texts.append(spec.dropout(seed=0).dropped_caption(scan.trigger))
    texts.append("")
    texts += [substitute_trigger(p, scan.trigger) for p in preview_prompts]
    return list(dict.fromkeys(texts))


@dataclass
class CacheStats:
    """Counts of entries found and computed since the cache object was made."""

    latent_hits: int = 0
    latent_misses: int = 0
    text_hits: int = 0
    text_misses: int = 0

    @property
    def misses(self) -> int:
        return self.latent_misses + self.text_misses

    @property
    def hits(self) -> int:
        return self.latent_hits + self.text_hits


def _key(fields: dict[str, object]) -> str:
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class EmbeddingCache:
    """Get-or-compute latents and text embeddings for one model identity, stored under ``cache_dir``.

    ``model_identity`` must change whenever the encoders would give different values (other weights, other
    text-encoder layers, other dtype); the trainer builds it from the model files it loaded.
    """

    cache_dir: Path | str | None = None
    model_identity: str = ""
    batch_size: int = 4
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()
        if not isinstance(self.model_identity, str) or not self.model_identity.strip():
            raise CacheError("the cache needs a model identity string (which weights produced the values)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CacheError(f"cache batch_size must be a whole number >= 1, got {self.batch_size!r}")

    # ---- keys and files

    def _latent_fields(self, image_sha256: str, bucket: Bucket) -> dict[str, object]:
        return {
            "kind": "latents",
            "version": CACHE_FORMAT_VERSION,
            "model": self.model_identity,
            "image_sha256": image_sha256,
            "bucket": [int(bucket[0]), int(bucket[1])],
        }

    def _text_fields(self, prompt: str) -> dict[str, object]:
        return {"kind": "text", "version": CACHE_FORMAT_VERSION, "model": self.model_identity, "prompt": prompt}

    def latent_key(self, image_sha256: str, bucket: Bucket | tuple[int, int]) -> str:
        return _key(self._latent_fields(image_sha256, Bucket(*bucket)))

    def text_key(self, prompt: str) -> str:
        return _key(self._text_fields(prompt))

    def entry_path(self, kind: str, key: str) -> Path:
        return Path(self.cache_dir) / kind / key[:2] / f"{key}.safetensors"

    def _read(self, path: Path, fields: dict[str, object]) -> "torch.Tensor | None":
        """The stored tensor, or None when absent, unreadable or not made from exactly ``fields``."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if json.loads(metadata.get("inputs", "null")) != fields:
                    return None
                return handle.get_tensor(_TENSOR_NAME)
        except Exception:  # noqa: BLE001 - a damaged entry is simply recomputed and replaced
            return None

    def _write(self, path: Path, fields: dict[str, object], value: "torch.Tensor") -> None:
        metadata = {"inputs": json.dumps(fields, sort_keys=True, ensure_ascii=False)}
        atomic_save_safetensors({_TENSOR_NAME: value}, path, metadata=metadata)

    @staticmethod
    def _encode(encode_fn: Callable, batch: object, expected: int, what: str) -> list["torch.Tensor"]:
        import torch

        with torch.no_grad():
            out = encode_fn(batch)
        if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != expected:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise CacheError(f"the {what} encoder returned {shape} for a batch of {expected}; expected ({expected}, …)")
        return [row.detach().to("cpu").contiguous() for row in out]

    # ---- public API

    def get_or_compute_latents(
        self, requests: Sequence[LatentRequest], encode_fn: Callable[["torch.Tensor"], "torch.Tensor"]
    ) -> list["torch.Tensor"]:
        """The latent of each request, in order; misses are encoded in batches of one bucket and stored."""
        import torch

        results: list[torch.Tensor | None] = [None] * len(requests)
        pending: dict[str, list[int]] = {}  # key -> request positions still to compute
        for position, request in enumerate(requests):
            fields = self._latent_fields(request.item.sha256, request.bucket)
            key = _key(fields)
            if key in pending:
                pending[key].append(position)
                continue
            found = self._read(self.entry_path("latents", key), fields)
            if found is None:
                pending[key] = [position]
                self.stats.latent_misses += 1
            else:
                results[position] = found
                self.stats.latent_hits += 1
        by_bucket: dict[Bucket, list[str]] = {}
        for key, positions in pending.items():
            by_bucket.setdefault(Bucket(*requests[positions[0]].bucket), []).append(key)
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), self.batch_size):
                chunk = keys[start : start + self.batch_size]
                firsts = [requests[pending[k][0]] for k in chunk]
                pixels = torch.stack([bucket_pixels(r.item, bucket) for r in firsts])
                values = self._encode(encode_fn, pixels, len(chunk), "image")
                for key, request, value in zip(chunk, firsts, values):
                    fields = self._latent_fields(request.item.sha256, bucket)
                    self._write(self.entry_path("latents", key), fields, value)
                    for position in pending[key]:
                        results[position] = value
        return results  # type: ignore[return-value]

    def get_or_compute_text(
        self, prompts: Sequence[str], encode_fn: Callable[[list[str]], "torch.Tensor"]
    ) -> list["torch.Tensor"]:
        """The embedding of each prompt, in order; each distinct missing prompt is encoded once and stored."""
        results: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for prompt in dict.fromkeys(prompts):
            if not isinstance(prompt, str):
                raise CacheError(f"prompts must be strings, got {prompt!r}")
            found = self._read(self.entry_path("text", self.text_key(prompt)), self._text_fields(prompt))
            if found is None:
                missing.append(prompt)
                self.stats.text_misses += 1
            else:
                results[prompt] = found
                self.stats.text_hits += 1
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for prompt, value in zip(chunk, self._encode(encode_fn, list(chunk), len(chunk), "text")):
                self._write(self.entry_path("text", self.text_key(prompt)), self._text_fields(prompt), value)
                results[prompt] = value
        return [results[p] for p in prompts]
