"""The identity dataset: a folder of images with optional same-stem ``.txt`` captions.

Everything here is cheap, model-free and read-only: a scan decodes every image once (so a corrupt file is found
*before* any model is loaded) and never writes a byte into the dataset folder.

Rules a user can rely on (the README and node help quote them):

* **Images** are ``.jpg .jpeg .png .webp .bmp`` (any case) directly inside the folder; subfolders, hidden files
  (``.DS_Store``, macOS ``._x.jpg``) and other files are ignored and counted. Order is by file name.
* **Captions**: ``photo1.png`` takes its caption from ``photo1.txt`` (UTF-8), else the default caption
  (``photo of [trigger]``). Whitespace and line breaks collapse to single spaces; an empty ``.txt`` means the default.
* ``[trigger]`` (any case) is replaced by the trigger word. A caption that still lacks the trigger word (matched as a
  whole word, case-sensitively, because the LoRA binds to that exact spelling) gets it by ``trigger_policy``:
  ``"prepend"`` (default: ``"kleinchar, a man in a park"``), ``"append"`` (``"a man in a park, kleinchar"``) or
  ``"keep"`` (left as written, with a warning). ``"exclude"`` is for a regularization set of class images: a caption
  that *contains* the trigger word is an error, because class images must not teach the word "any person".
* **Decoding**: EXIF orientation is applied; palette, grayscale, 16-bit, CMYK and alpha images become 8-bit RGB.
  Transparent pixels are composited over **white** (cut-outs then sit on a plain studio background instead of the
  black fringe a bare alpha drop leaves). 16-bit samples are scaled to 8 bits (``v / 257``), not clipped.
* **Buckets**: each resolution R has aspect buckets whose sides are multiples of 16 and whose area is about R²
  (aspects 1:2 … 2:1). An image goes to the bucket of the closest aspect ratio, is resized (Lanczos) until it
  *covers* the bucket, then centre-cropped: nothing is padded or squashed, and the crop only trims the small aspect
  difference. An image smaller than its bucket is upscaled (warning).
* **Caption dropout**: with probability p a sample's caption becomes the trigger word alone (default, keeps identity
  bound to the word) or ``""``; the draw is a hash of (seed, epoch, sample index), so a resumed run redraws the same.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import re
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Hashable, Iterator, Literal, NamedTuple, Sequence

from PIL import Image, ImageOps

from ..errors import DatasetError
from ..facts import PIXEL_MULTIPLE
from ..preset import PRESET

if TYPE_CHECKING:  # torch is only needed for pixels_from_image; keep `dataset check` light
    import torch

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
CAPTION_EXTENSION = ".txt"
TriggerPolicy = Literal["prepend", "append", "keep", "exclude"]
TRIGGER_POLICIES: tuple[str, ...] = ("prepend", "append", "keep", "exclude")
REGULARIZATION_CAPTION = "photo of a person"  # the caption of a class image without a .txt
DropoutCaption = Literal["trigger", "empty"]
DROPOUT_CAPTIONS: tuple[str, ...] = ("trigger", "empty")

MIN_RESOLUTION = 64  # real runs use 768/1024; the tiny test model trains at 64-128
BUCKET_ASPECTS: tuple[float, ...] = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 4 / 5, 1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0)
TINY_IMAGE_SIDE = 128  # shorter side below this carries too little detail for an identity at any resolution
# 128 Mi pixels (e.g. 16384 x 8192). Far beyond any useful training photo, below Pillow's own hard limit (2 x 89 M),
# and small enough that decoding cannot exhaust memory (~400 MB of RGB).
DEFAULT_MAX_IMAGE_PIXELS = 128 * 1024 * 1024

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


# --------------------------------------------------------------------------------------------------------------
# files and captions


def is_image_file(path: str | Path) -> bool:
    """True for a visible file name ending in a supported image extension (any case)."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def validate_trigger(trigger: object) -> str:
    """The trigger word, stripped; a missing, empty or placeholder trigger is an error that says what to give."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise DatasetError(
            f"the trigger word is missing (got {trigger!r}): give a rare word the LoRA will bind the identity to, "
            "e.g. --trigger kleinchar"
        )
    word = trigger.strip()
    if "\n" in word or "\r" in word:
        raise DatasetError(f"the trigger word {trigger!r} spans several lines: give a single word or short phrase")
    if word.lower() == PRESET.trigger_placeholder.lower():
        raise DatasetError(f"the trigger word cannot be the placeholder {word!r} itself: give the actual word")
    return word


_PLACEHOLDER_RE = re.compile(re.escape(PRESET.trigger_placeholder), re.IGNORECASE)


def substitute_trigger(text: str, trigger: str) -> str:
    """Replace ``[trigger]`` (any case) by the trigger word; used for captions and preview prompts alike."""
    return _PLACEHOLDER_RE.sub(lambda _match: trigger, text)


def contains_trigger(caption: str, trigger: str) -> bool:
    """Whether the trigger occurs as a whole word (case-sensitive: the LoRA binds to that exact spelling)."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption) is not None


def apply_trigger_policy(caption: str, trigger: str, policy: str = "prepend") -> str:
    """Give a caption that lacks the trigger word the word, as ``policy`` says (see the module docstring)."""
    if policy not in TRIGGER_POLICIES:
        raise DatasetError(f"trigger_policy must be one of {', '.join(TRIGGER_POLICIES)}; got {policy!r}")
    if contains_trigger(caption, trigger) or policy in ("keep", "exclude"):
        return caption
    if not caption:
        return trigger
    return f"{trigger}, {caption}" if policy == "prepend" else f"{caption}, {trigger}"


def normalise_caption(text: str) -> str:
    """Collapse whitespace and line breaks to single spaces."""
    return " ".join(text.split())


def read_caption_file(path: Path) -> str:
    """The caption text of ``path``; it must be UTF-8 (a byte-order mark is allowed)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path.name}: caption is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "re-save it as UTF-8 in your editor"
        ) from None
    return normalise_caption(text)


def dataset_folders(root: str | Path, max_depth: int = 2) -> list[str]:
    """Visible subfolders of ``root`` (up to ``max_depth`` deep) that directly hold an image, as sorted posix paths.

    This is the folder list the ComfyUI node offers from its input directory.
    """
    base = Path(root)
    found: list[str] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if child.is_dir():
                try:
                    if any(f.is_file() and is_image_file(f) for f in child.iterdir()):
                        found.append(child.relative_to(base).as_posix())
                except OSError:
                    continue
                if depth < max_depth:
                    walk(child, depth + 1)

    if base.is_dir():
        walk(base, 1)
    return sorted(found)


def folder_signature(folder: str | Path) -> str:
    """A hash of the folder listing with sizes and modification times: it changes when a file is added, removed,
    renamed or edited, and reads no file contents (cheap enough to check before every queue)."""
    root = Path(folder).expanduser()
    rows: list[object] = [str(root)]
    try:
        for entry in sorted(root.iterdir(), key=lambda p: p.name):
            stat = entry.stat()
            rows.append((entry.name, entry.is_dir(), stat.st_size, stat.st_mtime_ns))
    except OSError as exc:
        rows.append(("unreadable", type(exc).__name__))
    return _digest(rows)


# --------------------------------------------------------------------------------------------------------------
# image decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: 16-bit scaled, alpha composited over white, CMYK/palette/gray converted."""
    if image.mode in _SIXTEEN_BIT_MODES:
        import numpy as np

        samples = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        import numpy as np

        samples = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(samples), 0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image_rgb(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to upright 8-bit RGB, or raise DatasetError naming ``name``.

    The size is checked from the header before any pixel is decoded (decompression-bomb guard), and the whole
    image is then decoded, so a truncated file fails here rather than in the middle of training.
    """
    try:
        with warnings.catch_warnings():
            # we apply our own limit below; Pillow's softer warning threshold would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DatasetError(
            f"{name}: refused by the decompression-bomb guard ({exc}); an image this large is almost certainly "
            f"broken or hostile: resize it below {max_pixels:,} pixels"
        ) from None
    except Exception as exc:  # noqa: BLE001 - anything Pillow raises means this file is unusable
        raise DatasetError(f"{name}: not a readable image ({exc}); re-export it or remove it") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DatasetError(
            f"{name}: {width}x{height} is {width * height:,} pixels, over the decompression-bomb guard of "
            f"{max_pixels:,}; an image this large is almost certainly broken: resize it"
        )
    if width < 1 or height < 1:
        raise DatasetError(f"{name}: has an empty size {width}x{height}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(
            f"{name}: corrupt or truncated image ({exc}); re-export it, remove it, or opt in to skipping "
            "corrupt images (--skip-corrupt / skip_corrupt)"
        ) from None


def load_image_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Read and decode an image file (see ``decode_image_rgb``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return decode_image_rgb(data, path.name, max_pixels)


def pixels_from_image(image: Image.Image) -> "torch.Tensor":
    """An RGB image as a float32 tensor (3, H, W) in [-1, 1], the VAE's input range."""
    import numpy as np
    import torch

    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)


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
# scanning


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dataset. ``file`` is a name inside the folder, or None for the folder itself."""

    level: Literal["error", "warning"]
    file: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}" if self.file else self.message


@dataclass(frozen=True)
class ScanItem:
    """One usable image: where it is, its final caption, its upright size, its content hash and its buckets."""

    path: Path
    caption: str
    caption_source: Literal["file", "default"]
    width: int
    height: int
    sha256: str
    buckets: tuple[tuple[int, Bucket], ...]  # (resolution, bucket) for each training resolution

    @property
    def name(self) -> str:
        return self.path.name

    def bucket(self, resolution: int) -> Bucket:
        for res, bucket in self.buckets:
            if res == resolution:
                return bucket
        raise DatasetError(f"{self.name} was not scanned at resolution {resolution}")


class TrainingSample(NamedTuple):
    """One entry of an epoch: an image at one resolution. With several resolutions each image is several samples."""

    item_index: int
    resolution: int
    bucket: Bucket


@dataclass(frozen=True)
class DatasetScan:
    """The result of scanning a folder: usable items in order, ignored entries and every problem found."""

    folder: Path
    trigger: str
    resolutions: tuple[int, ...]
    trigger_policy: str
    items: tuple[ScanItem, ...]
    ignored: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    problems: tuple[Problem, ...] = ()

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.level == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.level == "warning")

    @property
    def ok(self) -> bool:
        return not self.errors

    def __len__(self) -> int:
        return len(self.items)

    def raise_for_errors(self) -> "DatasetScan":
        """Raise one DatasetError listing every error (naming each file); return self when there is none."""
        errors = self.errors
        if not errors:
            return self
        if len(errors) == 1:
            raise DatasetError(f"dataset {self.folder}: {errors[0]}")
        lines = "\n".join(f"  - {p}" for p in errors)
        raise DatasetError(f"dataset {self.folder} has {len(errors)} problems that stop training:\n{lines}")

    def samples(self) -> list[TrainingSample]:
        """Every image at every resolution, image-major: the index space of ``BucketBatchSampler``."""
        return [
            TrainingSample(index, resolution, item.bucket(resolution))
            for index, item in enumerate(self.items)
            for resolution in self.resolutions
        ]

    def bucket_counts(self, resolution: int) -> dict[Bucket, int]:
        """How many images fall in each bucket at ``resolution``, in bucket order."""
        counts: dict[Bucket, int] = defaultdict(int)
        for item in self.items:
            counts[item.bucket(resolution)] += 1
        order = {b: i for i, b in enumerate(buckets_for(resolution))}
        return dict(sorted(counts.items(), key=lambda kv: order[kv[0]]))

    def as_dict(self, max_captions: int | None = None) -> dict:
        """A JSON-friendly report (the ``dataset check --json`` object)."""
        items = self.items if max_captions is None else self.items[:max_captions]
        return {
            "folder": str(self.folder),
            "ok": self.ok,
            "images": len(self.items),
            "trigger": self.trigger,
            "trigger_policy": self.trigger_policy,
            "resolutions": list(self.resolutions),
            "buckets": {
                str(res): {str(b): n for b, n in self.bucket_counts(res).items()} for res in self.resolutions
            },
            "captions_from_files": sum(1 for i in self.items if i.caption_source == "file"),
            "captions": [{"file": i.name, "caption": i.caption} for i in items],
            "ignored": list(self.ignored),
            "skipped": list(self.skipped),
            "errors": [{"file": p.file, "message": p.message} for p in self.errors],
            "warnings": [{"file": p.file, "message": p.message} for p in self.warnings],
        }

    def summary(self, max_captions: int = 3) -> str:
        """A few lines a user can read on the node or in the terminal: counts, buckets, captions, problems."""
        from_files = sum(1 for i in self.items if i.caption_source == "file")
        lines = [f"dataset {self.folder}: {len(self.items)} images, trigger '{self.trigger}'"]
        lines.append(f"captions: {from_files} from .txt files, {len(self.items) - from_files} default")
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (" …" if len(self.ignored) > 5 else "")
            lines.append(f"ignored {len(self.ignored)} non-image entries: {shown}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable images: {', '.join(self.skipped)}")
        for res in self.resolutions:
            if self.items:
                counts = ", ".join(f"{b} x{n}" for b, n in self.bucket_counts(res).items())
                lines.append(f"buckets at {res}: {counts}")
        for item in self.items[:max_captions]:
            lines.append(f"  {item.name}: {item.caption}")
        if len(self.items) > max_captions:
            lines.append(f"  … {len(self.items) - max_captions} more")
        for title, problems in (("errors", self.errors), ("warnings", self.warnings)):
            if problems:
                lines.append(f"{title} ({len(problems)}):")
                lines.extend(f"  - {p}" for p in problems)
        return "\n".join(lines)


def inspect_dataset(
    folder: str | Path,
    trigger: str,
    default_caption: str = PRESET.default_caption,
    trigger_policy: str = "prepend",
    skip_corrupt: bool = False,
    resolutions: Sequence[int] | int | str = (PRESET.resolution,),
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> DatasetScan:
    """Scan a folder and collect every problem without raising for per-file ones (``dataset check`` uses this).

    Raises DatasetError only when there is nothing to scan: folder not found, or an unusable trigger or setting.
    """
    trigger = validate_trigger(trigger)
    resolutions = parse_resolutions(resolutions)
    if trigger_policy not in TRIGGER_POLICIES:
        raise DatasetError(f"trigger_policy must be one of {', '.join(TRIGGER_POLICIES)}; got {trigger_policy!r}")
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a folder: {root}")

    entries = sorted(root.iterdir(), key=lambda p: p.name)
    images = [p for p in entries if p.is_file() and is_image_file(p)]
    captions = {
        p.stem: p
        for p in entries
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == CAPTION_EXTENSION
    }
    ignored = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in images and p not in captions.values()]
    problems: list[Problem] = []
    items: list[ScanItem] = []
    skipped: list[str] = []
    used_captions: dict[str, list[str]] = defaultdict(list)
    without_trigger: list[str] = []
    with_trigger: list[str] = []  # trigger_policy "exclude": class images whose caption carries the trigger
    decoded: list[tuple[str, str]] = []  # (name, sha256) of every readable image, for the duplicate check

    for path in images:
        try:
            data = path.read_bytes()
            image = decode_image_rgb(data, path.name, max_image_pixels)
        except DatasetError as exc:
            message = str(exc).removeprefix(f"{path.name}: ")
            if skip_corrupt:
                skipped.append(path.name)
                problems.append(Problem("warning", path.name, f"skipped: {message}"))
            else:
                problems.append(Problem("error", path.name, message))
            continue
        except OSError as exc:
            problems.append(Problem("error", path.name, f"cannot be read ({exc.strerror or exc})"))
            continue
        sha256 = hashlib.sha256(data).hexdigest()
        decoded.append((path.name, sha256))

        caption_file = captions.get(path.stem)
        caption, source = default_caption, "default"
        if caption_file is not None:
            used_captions[caption_file.name].append(path.name)
            try:
                text = read_caption_file(caption_file)
            except DatasetError as exc:
                problems.append(Problem("error", caption_file.name, str(exc).removeprefix(f"{caption_file.name}: ")))
                continue
            if text:
                caption, source = text, "file"
            else:
                problems.append(Problem("warning", caption_file.name, "empty caption: the default caption is used"))
        caption = substitute_trigger(normalise_caption(caption), trigger)
        if not contains_trigger(caption, trigger) and trigger_policy == "keep":
            without_trigger.append(path.name)
        if contains_trigger(caption, trigger) and trigger_policy == "exclude":
            with_trigger.append(path.name)
        caption = apply_trigger_policy(caption, trigger, trigger_policy)

        width, height = image.size
        items.append(
            ScanItem(
                path=path,
                caption=caption,
                caption_source=source,  # type: ignore[arg-type]
                width=width,
                height=height,
                sha256=sha256,
                buckets=tuple((res, bucket_for(width, height, res)) for res in resolutions),
            )
        )

    for name, users in used_captions.items():
        if len(users) > 1:
            problems.append(Problem("warning", name, f"captions several images: {', '.join(users)}"))
    skipped_stems = {Path(n).stem for n in skipped}
    for stem, path in captions.items():
        if path.name not in used_captions and stem not in skipped_stems:
            ignored.append(path.name)
            problems.append(Problem("warning", path.name, "orphan caption: no image with this name; it is ignored"))
    ignored.sort()

    if not images:
        what = f"only non-image files ({len(ignored)})" if ignored else "no files"
        problems.append(
            Problem(
                "error",
                None,
                f"no images in {root}: it has {what}. Supported: {', '.join(sorted(IMAGE_EXTENSIONS))}",
            )
        )
    elif not items and not any(p.level == "error" for p in problems):
        problems.append(Problem("error", None, f"no usable images in {root}: every image was skipped"))

    if without_trigger:
        problems.append(
            Problem(
                "warning",
                None,
                f"{len(without_trigger)} captions lack the trigger '{trigger}' and are kept as written "
                f"(trigger_policy 'keep'): {', '.join(without_trigger)}",
            )
        )
    if with_trigger:
        problems.append(
            Problem(
                "error",
                None,
                f"{len(with_trigger)} regularization captions contain the trigger '{trigger}': {', '.join(with_trigger)}."
                f" Class images must not carry it (the word would learn 'any person'): caption them like "
                f"'{REGULARIZATION_CAPTION}' (the default caption here is {default_caption!r})",
            )
        )
    first_of_hash: dict[str, str] = {}
    for name, sha256 in decoded:
        if sha256 in first_of_hash:
            problems.append(
                Problem(
                    "warning",
                    name,
                    f"duplicate of {first_of_hash[sha256]} (same bytes): that image is trained twice as often",
                )
            )
        else:
            first_of_hash[sha256] = name
    for item in items:
        if min(item.width, item.height) < TINY_IMAGE_SIDE:
            problems.append(
                Problem(
                    "warning",
                    item.name,
                    f"tiny image ({item.width}x{item.height}): under {TINY_IMAGE_SIDE} px on its shorter side it "
                    "adds little identity detail",
                )
            )
        upscaled = [
            f"{bucket} at {res} (x{upscale_factor(item.width, item.height, bucket):.2f})"
            for res, bucket in item.buckets
            if upscale_factor(item.width, item.height, bucket) > 1
        ]
        if upscaled:
            problems.append(
                Problem(
                    "warning",
                    item.name,
                    f"{item.width}x{item.height} is smaller than its bucket {', '.join(upscaled)}: it will be "
                    "upscaled (softer detail)",
                )
            )

    return DatasetScan(
        folder=root,
        trigger=trigger,
        resolutions=resolutions,
        trigger_policy=trigger_policy,
        items=tuple(items),
        ignored=tuple(ignored),
        skipped=tuple(skipped),
        problems=tuple(problems),
    )


def scan_dataset(
    folder: str | Path,
    trigger: str,
    default_caption: str = PRESET.default_caption,
    trigger_policy: str = "prepend",
    skip_corrupt: bool = False,
    resolutions: Sequence[int] | int | str = (PRESET.resolution,),
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> DatasetScan:
    """Scan a folder for training; raise one DatasetError naming every bad file if any. Reads only."""
    return inspect_dataset(
        folder, trigger, default_caption, trigger_policy, skip_corrupt, resolutions, max_image_pixels
    ).raise_for_errors()


def bucket_pixels(item: ScanItem, bucket: Bucket, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> "torch.Tensor":
    """Training pixels (3, H, W) in [-1, 1] of an item fitted to ``bucket``; the file must be unchanged since the scan."""
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{item.path}: cannot be read ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise DatasetError(f"{item.path}: changed since the dataset was scanned; scan it again")
    return pixels_from_image(fit_to_bucket(decode_image_rgb(data, item.name, max_image_pixels), bucket))


# --------------------------------------------------------------------------------------------------------------
# caption dropout


def _unit_draw(*parts: object) -> float:
    """A uniform number in [0, 1) that depends only on ``parts``: the same on every machine and Python version."""
    digest = hashlib.sha256(":".join(str(p) for p in ("klein-lora", *parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _validate_dropout(probability: float, mode: str) -> None:
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise DatasetError(f"caption_dropout must be a probability between 0 and 1, got {probability!r}")
    if mode not in DROPOUT_CAPTIONS:
        raise DatasetError(f"dropout_caption must be one of {', '.join(DROPOUT_CAPTIONS)}; got {mode!r}")


@dataclass(frozen=True)
class CaptionDropout:
    """Replace a sample's caption, with probability ``probability``, by the trigger word alone or by ``""``.

    Whether sample ``index`` of ``epoch`` is dropped is a hash of (seed, epoch, index): reproducible on resume
    and independent of iteration order.
    """

    probability: float = PRESET.caption_dropout
    mode: DropoutCaption = "trigger"
    seed: int = 0

    def __post_init__(self) -> None:
        _validate_dropout(self.probability, self.mode)

    def is_dropped(self, epoch: int, index: int) -> bool:
        return self.probability > 0 and _unit_draw("caption-dropout", self.seed, epoch, index) < self.probability

    def dropped_caption(self, trigger: str) -> str:
        """The caption a dropped sample trains with."""
        return trigger if self.mode == "trigger" else ""

    def caption_for(self, caption: str, trigger: str, epoch: int, index: int) -> str:
        return self.dropped_caption(trigger) if self.is_dropped(epoch, index) else caption


def apply_caption_dropout(
    caption: str,
    trigger: str,
    *,
    epoch: int,
    index: int,
    seed: int = 0,
    probability: float = PRESET.caption_dropout,
    mode: DropoutCaption = "trigger",
) -> str:
    """The caption sample ``index`` trains with in ``epoch`` (see ``CaptionDropout``)."""
    return CaptionDropout(probability, mode, seed).caption_for(caption, trigger, epoch, index)


# --------------------------------------------------------------------------------------------------------------
# batching


class BucketBatchSampler:
    """Batches of sample indices, each batch from a single bucket, shuffled deterministically per (seed, epoch).

    ``bucket_keys[i]`` is the bucket of sample i (e.g. ``(s.resolution, s.bucket)`` for ``scan.samples()``).
    Per epoch: each bucket's samples are shuffled and cut into batches (a shorter last batch is kept unless
    ``drop_last``), then all batches are shuffled. With ``world_size`` > 1 the epoch's batch list is dealt out
    round-robin, so ranks get disjoint batches and the same count; the last ``len % world_size`` batches of an
    epoch (a different set every epoch) are left out so every rank takes the same number of training steps.
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DatasetError(f"rank must be in [0, world_size); got rank {rank!r}, world_size {world_size!r}")
        if not bucket_keys:
            raise DatasetError("cannot batch an empty dataset")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(bucket_keys):
            groups.setdefault(key, []).append(index)
        self._groups = list(groups.values())  # first-appearance order: deterministic for a deterministic scan
        per_bucket = [
            len(g) // batch_size if drop_last else math.ceil(len(g) / batch_size) for g in self._groups
        ]
        self._global_batches = sum(per_bucket)
        self.batches_per_epoch = self._global_batches // world_size
        self._last_epoch: tuple[int, list[list[int]]] | None = None  # batch_at is called every micro-batch
        if self.batches_per_epoch == 0:
            raise DatasetError(
                f"only {self._global_batches} batches of {batch_size} per epoch for {world_size} processes: "
                "lower the batch size or add images"
            )

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``: the same list every time for the same (seed, epoch)."""
        if self._last_epoch is not None and self._last_epoch[0] == epoch:
            return [list(batch) for batch in self._last_epoch[1]]
        result = self._compute_batches(epoch)
        self._last_epoch = (epoch, result)
        return [list(batch) for batch in result]

    def _compute_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(int(_unit_draw("batches", self.seed, epoch) * 2**53))
        batches: list[list[int]] = []
        for group in self._groups:
            order = list(group)
            rng.shuffle(order)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        usable = self.batches_per_epoch * self.world_size
        return batches[self.rank : usable : self.world_size]

    def batch_at(self, position: int) -> tuple[int, list[int]]:
        """(epoch, batch) of this rank's ``position``-th batch counted from the start of training (for resume)."""
        epoch, offset = divmod(position, self.batches_per_epoch)
        return epoch, self.batches(epoch)[offset]

    def iter_from(self, position: int = 0) -> Iterator[tuple[int, list[int]]]:
        """Endless (epoch, batch) pairs starting at this rank's ``position``-th batch."""
        epoch, offset = divmod(position, self.batches_per_epoch)
        while True:
            for batch in self.batches(epoch)[offset:]:
                yield epoch, batch
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        return (batch for _epoch, batch in self.iter_from(0))

    def __len__(self) -> int:
        return self.batches_per_epoch


# --------------------------------------------------------------------------------------------------------------
# the dataset a node hands on, and its fingerprint


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that defines a training dataset; the ``KLEIN_DATASET`` value. Cheap to pass; ``scan()`` reads."""

    folder: str
    trigger: str
    default_caption: str = PRESET.default_caption
    caption_dropout: float = PRESET.caption_dropout
    dropout_caption: DropoutCaption = "trigger"
    resolutions: tuple[int, ...] = (PRESET.resolution,)
    trigger_policy: TriggerPolicy = "prepend"
    skip_corrupt: bool = False
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", str(Path(self.folder).expanduser()))
        object.__setattr__(self, "trigger", validate_trigger(self.trigger))
        object.__setattr__(self, "resolutions", parse_resolutions(self.resolutions))
        _validate_dropout(self.caption_dropout, self.dropout_caption)
        if self.trigger_policy not in TRIGGER_POLICIES:
            raise DatasetError(
                f"trigger_policy must be one of {', '.join(TRIGGER_POLICIES)}; got {self.trigger_policy!r}"
            )

    def inspect(self) -> DatasetScan:
        """Scan without raising for per-file problems (for reports)."""
        return inspect_dataset(
            self.folder,
            self.trigger,
            self.default_caption,
            self.trigger_policy,
            self.skip_corrupt,
            self.resolutions,
            self.max_image_pixels,
        )

    def scan(self) -> DatasetScan:
        """Scan for training: raises DatasetError naming every bad file."""
        return self.inspect().raise_for_errors()

    def dropout(self, seed: int) -> CaptionDropout:
        return CaptionDropout(self.caption_dropout, self.dropout_caption, seed)

    def as_regularization(self, trigger: str) -> "DatasetSpec":
        """This folder as a regularization set for the identity with ``trigger``: captions as written, none may carry
        that word (whatever word the folder's own spec names), no dropout."""
        return replace(self, trigger=trigger, trigger_policy="exclude", caption_dropout=0.0)

    def with_changes(self, **changes: object) -> "DatasetSpec":
        return replace(self, **changes)  # type: ignore[arg-type]

    def as_dict(self) -> dict:
        data = asdict(self)
        data["resolutions"] = list(self.resolutions)
        return data


def _digest(rows: Sequence[object]) -> str:
    hasher = hashlib.sha256()
    for row in rows:
        hasher.update(repr(row).encode("utf-8"))
        hasher.update(b"\n")
    return hasher.hexdigest()


def fingerprint_parts(scan: DatasetScan, spec: DatasetSpec) -> dict[str, str]:
    """Hashes of each part of what a run trains on, so a resume check can name what changed.

    The folder path is left out on purpose: moving an unchanged dataset does not change the training.
    """
    return {
        "images": _digest([(i.name, i.sha256, i.width, i.height) for i in scan.items]),
        "captions": _digest([i.caption for i in scan.items]),
        "buckets": _digest([scan.resolutions, *[i.buckets for i in scan.items]]),
        "trigger": _digest([scan.trigger, scan.trigger_policy]),
        "caption_dropout": _digest([float(spec.caption_dropout), spec.dropout_caption]),
    }


def dataset_fingerprint(scan: DatasetScan, spec: DatasetSpec) -> str:
    """One sha256 over image hashes, captions, resolutions/buckets, trigger and dropout settings (stored for resume)."""
    return _digest(sorted(fingerprint_parts(scan, spec).items()))


def changed_fingerprint_parts(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Names of the parts that differ, e.g. ``["captions"]``, for a message that says what changed."""
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
