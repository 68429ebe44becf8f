"""Captions: the same-stem .txt file or the default caption, the trigger word and its policy, and caption dropout."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import DatasetError
from ..preset import PRESET

CAPTION_EXTENSION = ".txt"
TriggerPolicy = Literal["prepend", "append", "keep", "exclude"]
TRIGGER_POLICIES: tuple[str, ...] = ("prepend", "append", "keep", "exclude")
REGULARIZATION_CAPTION = "photo of a person"  # the caption of a class image without a .txt
DropoutCaption = Literal["trigger", "empty"]
DROPOUT_CAPTIONS: tuple[str, ...] = ("trigger", "empty")


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


def validate_trigger_policy(policy: object) -> str:
    """A trigger policy must be one of ``TRIGGER_POLICIES``; the one check the scan, the spec and captions share."""
    if policy not in TRIGGER_POLICIES:
        raise DatasetError(f"trigger_policy must be one of {', '.join(TRIGGER_POLICIES)}; got {policy!r}")
    return policy  # type: ignore[return-value]


def apply_trigger_policy(caption: str, trigger: str, policy: str = "prepend") -> str:
    """Give a caption that lacks the trigger word the word, as ``policy`` says (see the module docstring)."""
    validate_trigger_policy(policy)
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


# --------------------------------------------------------------------------------------------------------------
# caption dropout


def unit_draw(*parts: object) -> float:
    """A uniform number in [0, 1) that depends only on ``parts``: the same on every machine and Python version."""
    digest = hashlib.sha256(":".join(str(p) for p in ("klein-lora", *parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def validate_dropout(probability: float, mode: str) -> None:
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
        validate_dropout(self.probability, self.mode)

    def is_dropped(self, epoch: int, index: int) -> bool:
        return self.probability > 0 and unit_draw("caption-dropout", self.seed, epoch, index) < self.probability

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
