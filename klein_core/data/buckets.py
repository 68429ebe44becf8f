"""Resolutions and aspect buckets (sides multiples of 16, area about R²) and the batch sampler that draws each
batch from one bucket."""

from __future__ import annotations

import math
import random
import re
from functools import lru_cache
from typing import Hashable, Iterator, NamedTuple, Sequence

from PIL import Image

from ..errors import DatasetError
from ..facts import PIXEL_MULTIPLE
from ..preset import PRESET
from .captions import unit_draw

MIN_RESOLUTION = 64  # real runs use 768/1024; the tiny test model trains at 64-128
BUCKET_ASPECTS: tuple[float, ...] = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 4 / 5, 1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0)
# --------------------------------------------------------------------------------------------------------------
# resolutions and aspect buckets


class Bucket(NamedTuple):
    """A training size; both sides are multiples of 16."""

    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def validate_resolution(resolution: object) -> int:
    """A resolution must be a whole number >= 64 and a multiple of 16."""
    if isinstance(resolution, bool):
        raise DatasetError(f"resolution must be a whole number, got {resolution!r}")
    try:
        raw = str(resolution).strip() if isinstance(resolution, str) else resolution
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"resolution must be a whole number such as 1024 or 768, got {resolution!r}") from None
    if isinstance(resolution, float) and not resolution.is_integer():
        raise DatasetError(f"resolution must be a whole number, got {resolution!r}")
    if value < MIN_RESOLUTION or value % PIXEL_MULTIPLE:
        raise DatasetError(
            f"resolution {resolution!r} must be a multiple of {PIXEL_MULTIPLE} and at least {MIN_RESOLUTION} "
            f"(Klein uses {PRESET.resolution}, or 768)"
        )
    return value


def parse_resolutions(value: object) -> tuple[int, ...]:
    """``"1024"``, ``"1024,768"``, ``1024`` or ``[1024, 768]`` → validated resolutions, duplicates dropped."""
    if isinstance(value, str):
        parts: Sequence[object] = [p for p in re.split(r"[\s,;]+", value.strip()) if p]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    else:
        parts = list(value)  # type: ignore[call-overload]
    resolutions = tuple(dict.fromkeys(validate_resolution(p) for p in parts))
    if not resolutions:
        raise DatasetError(f"give at least one resolution, e.g. {PRESET.resolution}; got {value!r}")
    return resolutions


def _round_to_step(value: float) -> int:
    return max(PIXEL_MULTIPLE, int(round(value / PIXEL_MULTIPLE)) * PIXEL_MULTIPLE)


@lru_cache(maxsize=64)
def buckets_for(resolution: int) -> tuple[Bucket, ...]:
    """The aspect buckets of a resolution, from tallest (1:2) to widest (2:1); area ≈ resolution²."""
    resolution = validate_resolution(resolution)
    buckets: dict[Bucket, None] = {}
    for aspect in BUCKET_ASPECTS:
        width = _round_to_step(resolution * math.sqrt(aspect))
        height = _round_to_step(resolution / math.sqrt(aspect))
        buckets[Bucket(width, height)] = None
    return tuple(sorted(buckets, key=lambda b: b.width / b.height))


def bucket_for(width: int, height: int, resolution: int) -> Bucket:
    """The bucket whose aspect ratio is closest (in log ratio) to a ``width`` x ``height`` image."""
    if width < 1 or height < 1:
        raise DatasetError(f"image size must be positive, got {width}x{height}")
    log_aspect = math.log(width / height)
    return min(buckets_for(resolution), key=lambda b: abs(math.log(b.width / b.height) - log_aspect))


def upscale_factor(width: int, height: int, bucket: Bucket) -> float:
    """How much ``fit_to_bucket`` enlarges the image (> 1 means upscaling)."""
    return max(bucket.width / width, bucket.height / height)


def fit_to_bucket(image: Image.Image, bucket: Bucket | tuple[int, int]) -> Image.Image:
    """Resize so the image covers the bucket (keeping its aspect), then centre-crop to exactly the bucket."""
    bucket = Bucket(*bucket)
    width, height = image.size
    if (width, height) == tuple(bucket):
        return image.copy()
    scale = upscale_factor(width, height, bucket)
    crop_w, crop_h = bucket.width / scale, bucket.height / scale  # the source region that lands in the bucket
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return image.resize(tuple(bucket), Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h))


# --------------------------------------------------------------------------------------------------------------
# batching


class BucketBatchSampler:
    """Batches of sample indices, each batch from a single bucket, shuffled deterministically per (seed, epoch).

    ``bucket_keys[i]`` is the bucket of sample i (e.g. ``(s.resolution, s.bucket)`` for ``scan.samples()``).
    Per epoch: each bucket's samples are shuffled and cut into batches (a shorter last batch is kept unless
    ``drop_last``), then all batches are shuffled. A data-parallel run draws the global batch here and each rank
    trains its slice of it (train/session.py), so N processes see what one process with the global batch sees.
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        if not bucket_keys:
            raise DatasetError("cannot batch an empty dataset")
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(bucket_keys):
            groups.setdefault(key, []).append(index)
        self._groups = list(groups.values())  # first-appearance order: deterministic for a deterministic scan
        per_bucket = [len(g) // batch_size if drop_last else math.ceil(len(g) / batch_size) for g in self._groups]
        self.batches_per_epoch = sum(per_bucket)
        self._last_epoch: tuple[int, list[list[int]]] | None = None  # batch_at is called every micro-batch
        if self.batches_per_epoch == 0:
            raise DatasetError(
                f"no full batch of {batch_size} in an epoch (drop_last): lower the batch size or add images"
            )

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch``: the same list every time for the same (seed, epoch)."""
        if self._last_epoch is not None and self._last_epoch[0] == epoch:
            return [list(batch) for batch in self._last_epoch[1]]
        result = self._compute_batches(epoch)
        self._last_epoch = (epoch, result)
        return [list(batch) for batch in result]

    def _compute_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(int(unit_draw("batches", self.seed, epoch) * 2**53))
        batches: list[list[int]] = []
        for group in self._groups:
            order = list(group)
            rng.shuffle(order)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def batch_at(self, position: int) -> tuple[int, list[int]]:
        """(epoch, batch) of the ``position``-th batch counted from the start of training (for resume)."""
        epoch, offset = divmod(position, self.batches_per_epoch)
        return epoch, self.batches(epoch)[offset]

    def iter_from(self, position: int = 0) -> Iterator[tuple[int, list[int]]]:
        """Endless (epoch, batch) pairs starting at the ``position``-th batch."""
        epoch, offset = divmod(position, self.batches_per_epoch)
        while True:
            for batch in self.batches(epoch)[offset:]:
                yield epoch, batch
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        return (batch for _epoch, batch in self.iter_from(0))

    def __len__(self) -> int:
        return self.batches_per_epoch
