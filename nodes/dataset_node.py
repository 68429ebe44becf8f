"""KleinCaptionDataset: a dataset folder -> a ``KLEIN_DATASET`` (trigger-aware captions, dropout, buckets).

Only cheap work happens here: the folder is scanned (every image decoded once, nothing written) so a bad file is
reported on this node, before the trainer loads any model; then the identity check (``klein_core.health.identity``:
one face per photo, the same person, faces large and sharp enough, near-duplicates) draws its contact sheet, shown
as the node's preview image, and its flags join the summary. Latents and text embeddings are computed
and cached later by the trainer. The rules (captions, trigger policy, buckets, alpha) live in
``klein_core.data.scan`` and are quoted in the tooltips.
"""

from __future__ import annotations

import os

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..klein_core.data.buckets import parse_resolutions
from ..klein_core.data.captions import DROPOUT_CAPTIONS, TRIGGER_POLICIES, validate_trigger
from ..klein_core.health.contact_sheet import contact_sheet
from ..klein_core.health.identity import check_identity
from ..klein_core.data.scan import dataset_folders, folder_signature
from ..klein_core.data.spec import DatasetSpec
from ..klein_core.errors import DatasetError
from ..klein_core.preset import PRESET
from .types import KleinDataset

USE_PATH = "(use the path below)"  # the Combo entry meaning "read the path input instead"


def _folder_choices() -> list[str]:
    """Subfolders of ComfyUI's input directory that hold images, then the path option (never an empty list)."""
    return [*dataset_folders(folder_paths.get_input_directory()), USE_PATH]


def _resolve_folder(folder: str | None, path: str | None) -> str:
    """The dataset folder: the path input when given, else the chosen subfolder of the input directory."""
    if path and path.strip():
        return os.path.abspath(os.path.expanduser(path.strip()))
    if not folder or folder == USE_PATH:
        raise DatasetError(
            f"no dataset folder: choose a subfolder of {folder_paths.get_input_directory()} or type a path"
        )
    return os.path.join(folder_paths.get_input_directory(), folder)


def _inputs() -> list:
    """The node's inputs, in widget order (saved workflows store widget values by position)."""
    return [
        io.Combo.Input(
            "folder",
            options=_folder_choices(),
            tooltip="A subfolder of ComfyUI's input directory that holds your images (refresh the page "
            f"after adding one). Choose '{USE_PATH}' to use the path input instead.",
        ),
        io.String.Input(
            "path",
            default="",
            optional=True,
            tooltip="Optional: a dataset folder anywhere on disk. When not empty it overrides the list. "
            "Nothing is ever written into it.",
        ),
        io.String.Input(
            "trigger",
            default="",
            tooltip="The trigger word the identity binds to, e.g. a rare word like 'kleinchar'. It "
            "replaces [trigger] in captions and preview prompts. Required.",
        ),
        io.String.Input(
            "default_caption",
            default=PRESET.default_caption,
            tooltip="Caption of an image without a .txt file (or with an empty one). [trigger] becomes "
            "the trigger word.",
        ),
        io.Float.Input(
            "caption_dropout",
            default=PRESET.caption_dropout,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Probability that a sample trains with a dropped caption instead of its own "
            f"(starter value {PRESET.caption_dropout}). Deterministic per seed.",
        ),
        io.Combo.Input(
            "dropout_caption",
            options=list(DROPOUT_CAPTIONS),
            default="trigger",
            tooltip="What a dropped caption becomes: 'trigger' = the trigger word alone (keeps the "
            "identity bound to the word; default), 'empty' = an empty caption.",
        ),
        io.String.Input(
            "resolutions",
            default=str(PRESET.resolution),
            tooltip=f"Training resolution(s), comma-separated: {PRESET.resolution} by default, "
            "'1024,768' trains every image at both. Multiples of 16. Images go to the aspect bucket "
            "(sides multiple of 16, area about resolution squared) closest to their shape, are resized "
            "to cover it and centre-cropped.",
        ),
        io.Combo.Input(
            "trigger_policy",
            options=list(TRIGGER_POLICIES),
            default="prepend",
            tooltip="A caption that lacks the trigger word: 'prepend' -> 'word, caption' (default), "
            "'append' -> 'caption, word', 'keep' -> left as written (warned). 'exclude' is for a "
            "regularization set of class images: no caption may contain the word (the trainer reads its "
            "regularization input this way whatever is set here).",
        ),
        io.Boolean.Input(
            "skip_corrupt",
            default=False,
            tooltip="Off: a corrupt or truncated image stops the run with its name. On: it is skipped with a warning.",
        ),
    ]


class KleinCaptionDataset(io.ComfyNode):
    """Scans an identity dataset folder and hands the trainer a validated ``KLEIN_DATASET``."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinCaptionDataset",
            display_name="Klein Caption Dataset",
            category="Klein LoRA/Dataset",
            description=(
                "An identity dataset: images (jpg, jpeg, png, webp, bmp) with optional same-stem .txt captions. "
                "[trigger] in captions becomes the trigger word; captions lacking the word get it by the trigger "
                "policy. Every image is checked here, before any model loads; the folder is never written to. The "
                "identity check then flags photos without a face or with several, faces too small or blurred at the "
                "training resolution, a photo that may show a different person, and near-duplicate shots; its "
                "contact sheet (every image with its face box and flags, the odd ones first) is the preview image "
                "and its flags are listed in the summary. Face checks need the [likeness] extra."
            ),
            inputs=_inputs(),
            outputs=[
                KleinDataset.Output(
                    "dataset",
                    display_name="dataset",
                    tooltip="The dataset for the Klein LoRA Trainer (folder, trigger, captions, dropout, resolutions).",
                ),
                io.Int.Output(
                    "image_count",
                    display_name="image_count",
                    tooltip="Number of usable images: link it to the Repeats Calculator's image count.",
                ),
                io.String.Output(
                    "summary",
                    display_name="summary",
                    tooltip="Images, buckets, sample captions, ignored files, every warning, and the identity "
                    "check's flags (one face per photo, same person, face size and sharpness, near-duplicates).",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, folder=None, trigger=None, resolutions=None, path=None) -> bool | str:
        # Named arguments only: a **kwargs signature would switch off ComfyUI's min/max checks of the others.
        # Each defaults to None because a linked input is not known at validation time.
        try:
            if trigger is not None:
                validate_trigger(trigger)
            if resolutions is not None:
                parse_resolutions(resolutions)
            if folder is not None and not (path and path.strip()) and folder not in _folder_choices():
                return f"dataset folder {folder!r} is not in {folder_paths.get_input_directory()}"
        except DatasetError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder=None, path=None, **_widgets) -> str:
        # Widget values already key ComfyUI's cache; this adds the folder listing and modification times.
        try:
            return folder_signature(_resolve_folder(folder, path))
        except DatasetError as exc:
            return f"unresolved: {exc}"

    @classmethod
    def execute(
        cls,
        folder: str,
        trigger: str,
        default_caption: str,
        caption_dropout: float,
        dropout_caption: str,
        resolutions: str,
        trigger_policy: str,
        skip_corrupt: bool,
        path: str | None = None,
    ) -> io.NodeOutput:
        spec = DatasetSpec(
            folder=_resolve_folder(folder, path),
            trigger=trigger,
            default_caption=default_caption,
            caption_dropout=caption_dropout,
            dropout_caption=dropout_caption,  # type: ignore[arg-type]
            resolutions=parse_resolutions(resolutions),
            trigger_policy=trigger_policy,  # type: ignore[arg-type]
            skip_corrupt=skip_corrupt,
        )
        scan = spec.scan()  # raises DatasetError naming every bad file
        identity = check_identity(scan)  # warnings only: the user decides what to drop
        summary = "\n".join([scan.summary(), *identity.summary_lines()])
        sheet = contact_sheet(identity, title=f"{scan.folder.name}: {len(scan.items)} images")
        image = torch.from_numpy(np.asarray(sheet, dtype=np.float32) / 255.0).unsqueeze(0)
        return io.NodeOutput(
            spec, len(scan.items), summary, ui={**ui.PreviewImage(image, cls=cls).as_dict(), "text": (summary,)}
        )
