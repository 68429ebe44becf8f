"""The dataset a node hands on (folder, trigger, captions, resolutions, repeats), and its fingerprint: what a resume
and the latent cache compare."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..preset import PRESET
from .buckets import parse_resolutions
from .captions import (
    CaptionDropout,
    DropoutCaption,
    TriggerPolicy,
    validate_dropout,
    validate_trigger,
    validate_trigger_policy,
)
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .scan import DatasetScan, inspect_dataset, rows_digest

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
        validate_dropout(self.caption_dropout, self.dropout_caption)
        validate_trigger_policy(self.trigger_policy)

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


def fingerprint_parts(scan: DatasetScan, spec: DatasetSpec) -> dict[str, str]:
    """Hashes of each part of what a run trains on, so a resume check can name what changed.

    The folder path is left out on purpose: moving an unchanged dataset does not change the training.
    """
    return {
        "images": rows_digest([(i.name, i.sha256, i.width, i.height) for i in scan.items]),
        "captions": rows_digest([i.caption for i in scan.items]),
        "buckets": rows_digest([scan.resolutions, *[i.buckets for i in scan.items]]),
        "trigger": rows_digest([scan.trigger, scan.trigger_policy]),
        "caption_dropout": rows_digest([float(spec.caption_dropout), spec.dropout_caption]),
    }


def dataset_fingerprint(scan: DatasetScan, spec: DatasetSpec) -> str:
    """One sha256 over image hashes, captions, resolutions/buckets, trigger and dropout settings (stored for resume)."""
    return rows_digest(sorted(fingerprint_parts(scan, spec).items()))


def changed_fingerprint_parts(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Names of the parts that differ, e.g. ``["captions"]``, for a message that says what changed."""
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
