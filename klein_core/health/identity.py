"""The dataset identity check: one face per photo, the same person in every photo, faces large and sharp enough at
the training resolution, and no near-duplicate shots; run before any model is loaded.

A character LoRA's likeness is decided by its photos more than by any setting: one photo of somebody else, a group
shot, a face of 40 pixels at 1024, a blurred frame or the same shot five times weakens or skews the identity, and a
user only sees it hours later. This module looks at each image *at training scale* (the size it has once resized
to cover its bucket, so a 4000-px photo is decoded at about 1000 px and costs little) and reports findings, each a
warning with a reason and a ``kind`` (``FINDING_KINDS``). A set in which most images are flagged is NOT READY.

The face checks use the face embedder of the optional ``[likeness]`` extra (dlib's HOG detector and 128-d face
descriptor, ``likeness.FaceLikeness``; dlib itself is imported only when the embedder is built); without it the
near-duplicate check still runs and ``IdentityReport.note`` says how to add the face checks. It lives in ``health``
(not ``data``) because it needs the face embedder, and ``health`` may import ``data`` but not the other way. Nothing
is written into the dataset folder: images are only read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from ..data.buckets import upscale_factor
from ..data.images import decode_reduced_rgb
from ..data.scan import DatasetScan, ScanItem
from ..errors import DatasetError
from .likeness import FACE_EXTRA_HINT, FaceBox, FaceLikeness, face_backend_available
from .stats import laplacian

FINDING_KINDS: tuple[str, ...] = (
    "no_face",
    "several_faces",
    "small_face",
    "blurry",
    "different_person",
    "near_duplicate",
)
DHASH_BITS = 64  # a difference hash of an 9x8 grey thumbnail: one bit per horizontal neighbour pair
THUMBNAIL_SIDE = 192  # the contact sheet's cells; kept per image so the sheet needs no second decode


def _why(default: float, reason: str):
    return field(default=default, metadata={"why": reason})


@dataclass(frozen=True)
class IdentityThresholds:
    """Every threshold of the identity check, each with the reason for its value (``reasons()``)."""

    small_face_px: int = _why(
        64,
        "short side of the face box in pixels at the smallest training resolution: below 64 px the face spans "
        "fewer than 4x4 transformer tokens (16 px each), the eyes are about one latent pixel, and the LoRA binds "
        "the trigger to a blob instead of a face; a full-body shot at 1024 (face ~90 px) still passes",
    )
    sharpness_side: int = _why(
        128,
        "a face larger than this is resized to 128x128 before measuring sharpness, so close-ups and smaller faces "
        "are measured on the same scale (smaller faces are measured as they are, never upscaled)",
    )
    blurry_below: float = _why(
        40.0,
        "variance of the 4-neighbour Laplacian of the grey face region (0-255 levels), measured at training scale "
        "on the public-domain test portraits: sharp faces give 130-2200 (soft upscaled crops lowest), a Gaussian "
        "blur of sigma 1.5 px gives 7-26 on the soft ones, sigma 3 on a sharp one 27-32; 40 flags a visibly "
        "blurred face and leaves a soft but usable one alone",
    )
    second_face_min_score: float = _why(
        0.5,
        "a second face counts only at this detector confidence: dlib's HOG detector, asked for everything above "
        "0, also fires at 0.0-0.2 on clothing and backgrounds (the astronaut's suit patch gives 0.12), while real "
        "faces score 0.9-1.7 (a blurred one still 0.4-1.0)",
    )
    different_person_distance: float = _why(
        0.6,
        "dlib's face descriptor puts two photos of one person closer than 0.6 (its standard tolerance, 99.4% on "
        "the LFW benchmark); a face farther than that from the set's most typical photo may be somebody else",
    )
    min_faces_to_compare: int = _why(
        4,
        "identity needs at least 4 single-face photos: each is compared with the medoid of the others, and among "
        "fewer than 3 others the medoid is a tie between two photos",
    )
    near_duplicate_bits: int = _why(
        6,
        "two images whose 64-bit difference hashes differ in at most 6 bits are the same shot: measured on the "
        "test portraits, a re-encode or resize differs in 0 bits, the same framing shifted by 1% of its side in "
        "2-5, by 2% in 4-11, and jittered crops of one photo (new framings, which do teach) in 19 or more",
    )
    not_ready_share: float = _why(
        0.5,
        "when more than half of the images are flagged the set as a whole is not a clean identity: NOT READY",
    )

    def reasons(self) -> dict[str, str]:
        """Each threshold's name -> 'value: reason' (the JSON report and the docs quote them)."""
        return {f.name: f"{getattr(self, f.name)}: {f.metadata['why']}" for f in fields(self)}


THRESHOLDS = IdentityThresholds()


class Finding(NamedTuple):
    """One identity warning about one image: its ``kind`` (one of ``FINDING_KINDS``) and a message with the reason."""

    kind: str
    message: str


@dataclass
class ImageCheck:
    """What the check measured on one image. Face boxes are in pixels of the training-scale image (``scale`` x
    the original size); ``face_px`` is the main face's short side at the smallest training resolution."""

    name: str
    sha256: str
    width: int
    height: int
    scale: float
    dhash: int
    thumbnail: Image.Image = field(repr=False)
    faces: tuple[FaceBox, ...] = ()
    descriptors: tuple[np.ndarray, ...] = field(default=(), repr=False)
    face_px: int | None = None
    face_resolution: int | None = None
    sharpness: float | None = None
    distance: float | None = None
    compared_to: str | None = None
    findings: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "file": self.name,
            "faces": len(self.faces),
            "face_px": self.face_px,
            "sharpness": None if self.sharpness is None else round(self.sharpness, 1),
            "distance": None if self.distance is None else round(self.distance, 3),
            "compared_to": self.compared_to,
            "findings": [{"kind": f.kind, "message": f.message} for f in self.findings],
        }


@dataclass(frozen=True)
class IdentityReport:
    """The identity check of a scanned dataset: per-image measurements and findings, and the verdict."""

    images: tuple[ImageCheck, ...]
    face_checks: bool
    note: str = ""  # why the face checks did not run, and how to add them
    notes: tuple[str, ...] = ()  # set-level remarks (no face anywhere, too few faces to compare)
    typical_distance: float | None = None
    thresholds: IdentityThresholds = THRESHOLDS

    @property
    def flagged(self) -> tuple[ImageCheck, ...]:
        return tuple(i for i in self.images if i.findings)

    @property
    def ready(self) -> bool:
        """False when more than ``not_ready_share`` of the images have a finding."""
        return len(self.flagged) <= self.thresholds.not_ready_share * len(self.images)

    def verdict(self) -> str:
        flagged = f"{len(self.flagged)} of {len(self.images)} images flagged"
        return f"identity: {flagged}" if self.ready else f"NOT READY: {flagged} by the identity check"

    def as_dict(self) -> dict:
        """The ``identity`` object of ``dataset check --json``: per file its findings with ``kind`` and message."""
        return {
            "face_checks": self.face_checks,
            "note": self.note,
            "ready": self.ready,
            "flagged": len(self.flagged),
            "typical_distance": None if self.typical_distance is None else round(self.typical_distance, 3),
            "notes": list(self.notes),
            "thresholds": self.thresholds.reasons(),
            "files": [i.as_dict() for i in self.images],
        }

    def summary_lines(self) -> list[str]:
        """The identity part of the text report: how it was checked, set-level notes, then every finding."""
        how = "faces by dlib" if self.face_checks else "near-duplicates only"
        typical = "" if self.typical_distance is None else f", typical face distance {self.typical_distance:.2f}"
        lines = [f"identity check ({how}{typical}): {len(self.flagged)} of {len(self.images)} images flagged"]
        if self.note:
            lines.append(f"  {self.note}")
        lines.extend(f"  {note}" for note in self.notes)
        for image in self.flagged:
            lines.extend(f"  - {image.name}: [{f.kind}] {f.message}" for f in image.findings)
        return lines


# --------------------------------------------------------------------------------------------------------------
# the check


def face_checker() -> tuple[FaceLikeness | None, str]:
    """The face embedder of the ``[likeness]`` extra, or (None, one line saying how to add the face checks)."""
    available, why = face_backend_available()
    if not available:
        return None, f"face checks skipped ({why.split(':')[0]}); add them with: {FACE_EXTRA_HINT}"
    return FaceLikeness(), ""


def check_identity(
    scan: DatasetScan,
    thresholds: IdentityThresholds = THRESHOLDS,
    face: FaceLikeness | None | bool = True,
) -> IdentityReport:
    """Check every usable image of ``scan``; reads the files, writes nothing.

    ``face``: True = the face checks when the extra is installed; False = near-duplicates only; or a
    ``FaceLikeness`` to reuse (its models load once).
    """
    note = ""
    if face is True:
        face, note = face_checker()
    elif face is False:
        face, note = None, "face checks off"
    images = [_look_at(item, scan.resolutions, face, thresholds) for item in scan.items]
    notes: list[str] = []
    typical = None
    if face is not None:
        notes += _flag_faces(images, thresholds)
        typical, identity_notes = _flag_identity(images, thresholds)
        notes += identity_notes
    _flag_near_duplicates(images, thresholds)
    return IdentityReport(tuple(images), face is not None, note, tuple(notes), typical, thresholds)


def _look_at(
    item: ScanItem, resolutions: Sequence[int], face: FaceLikeness | None, thresholds: IdentityThresholds
) -> ImageCheck:
    """Decode one image at training scale (the largest resolution's) and measure it: hash, faces, size, sharpness."""
    scales = {res: upscale_factor(item.width, item.height, item.bucket(res)) for res in resolutions}
    scale = max(scales.values())
    size = (max(1, round(item.width * scale)), max(1, round(item.height * scale)))
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{item.path}: cannot be read any more ({exc.strerror or exc}); scan it again") from None
    image = decode_reduced_rgb(data, item.name, *size)
    thumbnail = image.copy()
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    check = ImageCheck(item.name, item.sha256, item.width, item.height, scale, dhash(image), thumbnail)
    if face is None:
        return check
    pixels = np.asarray(image)
    boxes = face.detect_faces(pixels, 0) or face.detect_faces(pixels, 1)  # 1 = also faces of 40-80 px, 4x the cost
    if not boxes:
        return check
    main, *others = boxes
    check.faces = (main, *(b for b in others if b.score >= thresholds.second_face_min_score))
    check.descriptors = tuple(face.descriptor(pixels, box) for box in check.faces)
    smallest = min(scales, key=scales.get)
    check.face_px = round(main.short_side * scales[smallest] / scale)
    check.face_resolution = smallest
    check.sharpness = face_sharpness(image, main, thresholds.sharpness_side)
    return check


def face_sharpness(image: Image.Image, box: FaceBox, side: int) -> float | None:
    """Variance of the Laplacian of the grey face region, the face resized down to ``side`` if larger; None when
    the visible part of the box is too small to measure."""
    left, top = max(0, box.left), max(0, box.top)
    right, bottom = min(image.width, box.right), min(image.height, box.bottom)
    if min(right - left, bottom - top) < 8:
        return None
    crop = image.convert("L").crop((left, top, right, bottom))
    if max(crop.size) > side:
        scale = side / max(crop.size)
        crop = crop.resize(
            (max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.Resampling.BOX
        )
    return float(laplacian(np.asarray(crop, dtype=np.float64)).var())


def dhash(image: Image.Image) -> int:
    """The 64-bit difference hash: a 9x8 grey thumbnail, one bit per pixel brighter than its right neighbour.

    It survives re-encoding, resizing and colour shifts (it keeps only the sign of coarse gradients) and changes
    with the framing, so it finds the same shot, not the same person.
    """
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def _flag_faces(images: list[ImageCheck], thresholds: IdentityThresholds) -> list[str]:
    """no_face, several_faces, small_face and blurry findings; a set-level note when no image shows a face."""
    if images and not any(i.faces for i in images):
        return [
            f"no face found in any of the {len(images)} images: the face checks do not apply (a drawn or non-human "
            "character?); if these are photos of a person, the faces are too small, turned away or covered"
        ]
    for image in images:
        if not image.faces:
            image.findings.append(
                Finding(
                    "no_face",
                    "no face found: the identity is not visible here (or the face is turned away, "
                    "covered, or under about 40 px at training scale)",
                )
            )
            continue
        if len(image.faces) > 1:
            image.findings.append(
                Finding("several_faces", f"{len(image.faces)} faces: crop to the character, or caption who is who")
            )
        if image.face_px is not None and image.face_px < thresholds.small_face_px:
            image.findings.append(
                Finding(
                    "small_face",
                    f"the face is {image.face_px} px at {image.face_resolution} (under "
                    f"{thresholds.small_face_px} px): too few pixels to learn the identity; crop closer",
                )
            )
        if image.sharpness is not None and image.sharpness < thresholds.blurry_below:
            image.findings.append(
                Finding(
                    "blurry",
                    f"the face looks blurred (sharpness {image.sharpness:.0f}, under "
                    f"{thresholds.blurry_below:g}): a soft face teaches a soft likeness",
                )
            )
    return []


def leave_one_out_medoids(distances: np.ndarray) -> np.ndarray:
    """For each row i of a symmetric distance matrix, the index of the medoid of all the *other* points: the point
    j != i with the smallest sum of distances to the rest (i left out)."""
    n = len(distances)
    totals = distances.sum(axis=1)
    cost = totals[None, :] - distances  # cost[i, j] = sum over k != i of d(j, k)
    cost[np.arange(n), np.arange(n)] = np.inf
    return np.argmin(cost, axis=1)


def _flag_identity(images: list[ImageCheck], thresholds: IdentityThresholds) -> tuple[float | None, list[str]]:
    """different_person findings: each single-face photo against the leave-one-out medoid of the others; a photo
    with several faces by its face nearest to the medoid of all single-face photos. Returns the typical distance."""
    single = [i for i in images if len(i.faces) == 1]
    if len(single) < thresholds.min_faces_to_compare:
        if any(i.faces for i in images):
            return None, [f"only {len(single)} photos show one face: identity needs {thresholds.min_faces_to_compare}"]
        return None, []
    vectors = np.stack([i.descriptors[0] for i in single])
    squared = (vectors**2).sum(axis=1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * vectors @ vectors.T, 0.0))
    for index, medoid in enumerate(leave_one_out_medoids(distances)):
        single[index].distance = float(distances[index, medoid])
        single[index].compared_to = single[medoid].name
    typical = float(np.median([i.distance for i in single]))
    overall = int(np.argmin(distances.sum(axis=1)))
    for image in images:
        if len(image.faces) > 1:
            image.distance = min(float(np.linalg.norm(d - vectors[overall])) for d in image.descriptors)
            image.compared_to = single[overall].name
    limit = thresholds.different_person_distance
    for image in images:
        if image.distance is not None and image.distance > limit:
            image.findings.append(
                Finding(
                    "different_person",
                    f"may be a different person: face distance {image.distance:.2f} to "
                    f"{image.compared_to} (the set's most typical photo), over {limit:g}; the set's typical "
                    f"distance is {typical:.2f}",
                )
            )
    return typical, []


def _flag_near_duplicates(images: list[ImageCheck], thresholds: IdentityThresholds) -> None:
    """near_duplicate findings: an image whose hash is within ``near_duplicate_bits`` of an earlier image's (byte
    duplicates are left to the scan, which already reports them)."""
    for later_index, later in enumerate(images):
        for earlier in images[:later_index]:
            bits = (later.dhash ^ earlier.dhash).bit_count()
            if later.sha256 != earlier.sha256 and bits <= thresholds.near_duplicate_bits:
                later.findings.append(
                    Finding(
                        "near_duplicate",
                        f"near-duplicate of {earlier.name} (perceptual hash differs in {bits} "
                        f"of {DHASH_BITS} bits): the same shot trains twice as often",
                    )
                )
                break
