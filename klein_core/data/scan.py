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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Sequence

from ..errors import DatasetError
from ..preset import PRESET
from .buckets import Bucket, bucket_for, buckets_for, fit_to_bucket, parse_resolutions, upscale_factor
from .captions import (
    CAPTION_EXTENSION,
    REGULARIZATION_CAPTION,
    apply_trigger_policy,
    contains_trigger,
    normalise_caption,
    read_caption_file,
    substitute_trigger,
    validate_trigger,
    validate_trigger_policy,
)
from .images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, decode_image_rgb, is_image_file, pixels_from_image

if TYPE_CHECKING:  # torch is only needed for pixels; keep `dataset check` light
    import torch

TINY_IMAGE_SIDE = 128  # shorter side below this carries too little detail for an identity at any resolution


def rows_digest(rows: Sequence[object]) -> str:
    """A sha256 over the rows' reprs, one per line: a stable summary of a file list or a config."""
    hasher = hashlib.sha256()
    for row in rows:
        hasher.update(repr(row).encode("utf-8"))
        hasher.update(b"\n")
    return hasher.hexdigest()


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
    return rows_digest(rows)


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
            "buckets": {str(res): {str(b): n for b, n in self.bucket_counts(res).items()} for res in self.resolutions},
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
    The steps: list the folder, read each image with its caption, then the checks that need the whole set
    (captions, folder-level problems, duplicates, sizes).
    """
    trigger = validate_trigger(trigger)
    resolutions = parse_resolutions(resolutions)
    trigger_policy = validate_trigger_policy(trigger_policy)
    root = _dataset_root(folder)
    listing = _list_folder(root)
    state = _ScanState()
    for path in listing.images:
        _read_item(
            path, listing, state, trigger, default_caption, trigger_policy, skip_corrupt, resolutions, max_image_pixels
        )
    _check_caption_files(listing, state)
    _check_folder(root, listing, state, trigger, default_caption)
    _check_duplicates(state)
    _check_sizes(state)
    return DatasetScan(
        folder=root,
        trigger=trigger,
        resolutions=resolutions,
        trigger_policy=trigger_policy,
        items=tuple(state.items),
        ignored=tuple(sorted(listing.ignored)),
        skipped=tuple(state.skipped),
        problems=tuple(state.problems),
    )


def scan_dataset(folder: str | Path, trigger: str, **options) -> DatasetScan:
    """Scan a folder for training (``options`` as ``inspect_dataset``); raise one DatasetError naming every bad
    file if any. Reads only."""
    return inspect_dataset(folder, trigger, **options).raise_for_errors()


def _dataset_root(folder: str | Path) -> Path:
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a folder: {root}")
    return root


@dataclass
class _FolderListing:
    """A folder's entries sorted by name: images, captions by stem, and everything else (ignored)."""

    images: list[Path]
    captions: dict[str, Path]
    ignored: list[str]


def _list_folder(root: Path) -> _FolderListing:
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    images = [p for p in entries if p.is_file() and is_image_file(p)]
    captions = {
        p.stem: p
        for p in entries
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == CAPTION_EXTENSION
    }
    ignored = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in images and p not in captions.values()]
    return _FolderListing(images, captions, ignored)


@dataclass
class _ScanState:
    """What the per-image step collects for the whole-set checks."""

    problems: list[Problem] = field(default_factory=list)
    items: list[ScanItem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    used_captions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    without_trigger: list[str] = field(default_factory=list)  # trigger_policy "keep": captions left without it
    with_trigger: list[str] = field(default_factory=list)  # trigger_policy "exclude": class captions carrying it
    decoded: list[tuple[str, str]] = field(default_factory=list)  # (name, sha256) of every readable image


def _read_item(
    path: Path,
    listing: _FolderListing,
    state: _ScanState,
    trigger: str,
    default_caption: str,
    trigger_policy: str,
    skip_corrupt: bool,
    resolutions: tuple[int, ...],
    max_image_pixels: int,
) -> None:
    """Decode one image and resolve its caption; add a ScanItem, or the problem that stops this image."""
    try:
        data = path.read_bytes()
        image = decode_image_rgb(data, path.name, max_image_pixels)
    except DatasetError as exc:
        message = str(exc).removeprefix(f"{path.name}: ")
        if skip_corrupt:
            state.skipped.append(path.name)
            state.problems.append(Problem("warning", path.name, f"skipped: {message}"))
        else:
            state.problems.append(Problem("error", path.name, message))
        return
    except OSError as exc:
        state.problems.append(Problem("error", path.name, f"cannot be read ({exc.strerror or exc})"))
        return
    sha256 = hashlib.sha256(data).hexdigest()
    state.decoded.append((path.name, sha256))

    caption_file = listing.captions.get(path.stem)
    caption, source = default_caption, "default"
    if caption_file is not None:
        state.used_captions[caption_file.name].append(path.name)
        try:
            text = read_caption_file(caption_file)
        except DatasetError as exc:
            state.problems.append(Problem("error", caption_file.name, str(exc).removeprefix(f"{caption_file.name}: ")))
            return
        if text:
            caption, source = text, "file"
        else:
            state.problems.append(Problem("warning", caption_file.name, "empty caption: the default caption is used"))
    caption = substitute_trigger(normalise_caption(caption), trigger)
    if not contains_trigger(caption, trigger) and trigger_policy == "keep":
        state.without_trigger.append(path.name)
    if contains_trigger(caption, trigger) and trigger_policy == "exclude":
        state.with_trigger.append(path.name)
    width, height = image.size
    state.items.append(
        ScanItem(
            path=path,
            caption=apply_trigger_policy(caption, trigger, trigger_policy),
            caption_source=source,  # type: ignore[arg-type]
            width=width,
            height=height,
            sha256=sha256,
            buckets=tuple((res, bucket_for(width, height, res)) for res in resolutions),
        )
    )


def _check_caption_files(listing: _FolderListing, state: _ScanState) -> None:
    """A caption shared by several images (same stem, other extensions), and captions with no image."""
    for name, users in state.used_captions.items():
        if len(users) > 1:
            state.problems.append(Problem("warning", name, f"captions several images: {', '.join(users)}"))
    skipped_stems = {Path(n).stem for n in state.skipped}
    for stem, path in listing.captions.items():
        if path.name not in state.used_captions and stem not in skipped_stems:
            listing.ignored.append(path.name)
            state.problems.append(
                Problem("warning", path.name, "orphan caption: no image with this name; it is ignored")
            )


def _check_folder(root: Path, listing: _FolderListing, state: _ScanState, trigger: str, default_caption: str) -> None:
    """Problems of the folder as a whole: nothing usable, captions left without the trigger, class captions with it."""
    if not listing.images:
        what = f"only non-image files ({len(listing.ignored)})" if listing.ignored else "no files"
        supported = ", ".join(sorted(IMAGE_EXTENSIONS))
        state.problems.append(Problem("error", None, f"no images in {root}: it has {what}. Supported: {supported}"))
    elif not state.items and not any(p.level == "error" for p in state.problems):
        state.problems.append(Problem("error", None, f"no usable images in {root}: every image was skipped"))
    if state.without_trigger:
        state.problems.append(
            Problem(
                "warning",
                None,
                f"{len(state.without_trigger)} captions lack the trigger '{trigger}' and are kept as written "
                f"(trigger_policy 'keep'): {', '.join(state.without_trigger)}",
            )
        )
    if state.with_trigger:
        state.problems.append(
            Problem(
                "error",
                None,
                f"{len(state.with_trigger)} regularization captions contain the trigger '{trigger}': "
                f"{', '.join(state.with_trigger)}. Class images must not carry it (the word would learn 'any "
                f"person'): caption them like '{REGULARIZATION_CAPTION}' (the default caption here is "
                f"{default_caption!r})",
            )
        )


def _check_duplicates(state: _ScanState) -> None:
    """Byte-identical images: each copy after the first trains the same picture again."""
    first_of_hash: dict[str, str] = {}
    for name, sha256 in state.decoded:
        if sha256 in first_of_hash:
            state.problems.append(
                Problem(
                    "warning",
                    name,
                    f"duplicate of {first_of_hash[sha256]} (same bytes): that image is trained twice as often",
                )
            )
        else:
            first_of_hash[sha256] = name


def _check_sizes(state: _ScanState) -> None:
    """Images too small to carry identity detail, and images that training must upscale."""
    for item in state.items:
        if min(item.width, item.height) < TINY_IMAGE_SIDE:
            state.problems.append(
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
            state.problems.append(
                Problem(
                    "warning",
                    item.name,
                    f"{item.width}x{item.height} is smaller than its bucket {', '.join(upscaled)}: it will be "
                    "upscaled (softer detail)",
                )
            )


def bucket_pixels(item: ScanItem, bucket: Bucket, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> "torch.Tensor":
    """Training pixels (3, H, W) in [-1, 1] of an item fitted to ``bucket``; the file must be unchanged since the
    scan."""
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{item.path}: cannot be read ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise DatasetError(f"{item.path}: changed since the dataset was scanned; scan it again")
    return pixels_from_image(fit_to_bucket(decode_image_rgb(data, item.name, max_image_pixels), bucket))
