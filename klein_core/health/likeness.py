"""Likeness per checkpoint: how close a checkpoint's previews are to the training images, behind a small interface.

Two backends, both with no download at run time:

- :class:`FaceLikeness` (optional extra ``[likeness]``): dlib's HOG face detector, 5-point shape predictor and
  ResNet face embedder, with the weights that ship inside the ``face-recognition-models`` PyPI package (dlib's
  models) and the prebuilt ``dlib-bin`` wheel. The ``face_recognition`` package itself is not used: it would pull a
  source build of dlib.
- :class:`ImageSimilarityLikeness`: a generic image similarity (coarse colour + downsampled structure), always
  available and labelled as such, used when the extra is missing or the training images have no detectable face.

:func:`choose_backend` picks one and says which (``backend.label``).

Scores are in [0, 1], higher = more alike: for each preview, the similarity to its best-matching reference, averaged
over the previews.
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence

import numpy as np

from .stats import as_rgb_float_images

FACE_LABEL = "face similarity (dlib face embedder)"
GENERIC_LABEL = "generic image similarity (whole images, not faces)"
FACE_EXTRA_HINT = "pip install 'klein-lora-trainer[likeness]' (face-recognition-models + dlib-bin)"

FACE_MAX_SIDE = 1024  # larger images are downscaled before detection: faster, and the 150 px face chip is unchanged
FACE_SMALL_SIDE = 600  # below this the detector also searches an upsampled image, to find small faces


class LikenessBackend(ABC):
    """A way to score previews against reference (training) images.

    ``embed`` maps one image to a vector, or None when the image has nothing this backend can judge (no face).
    ``similarity`` compares two vectors in [0, 1]. ``score`` is the mean over previews of the best match.
    """

    name: str = "abstract"
    label: str = "abstract"

    @abstractmethod
    def embed(self, image: Any) -> np.ndarray | None:
        """One image (HxWx3 float in [0, 1], uint8, or PIL) → a vector, or None."""

    @abstractmethod
    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Similarity of two embeddings, in [0, 1]."""

    def embed_references(self, references: Any) -> list[np.ndarray]:
        """Embed the reference images once (the trainer reuses them at every checkpoint); skips unusable ones."""
        vectors = [self.embed(img) for img in as_rgb_float_images(references)]
        return [v for v in vectors if v is not None]

    def score_embedded(self, previews: Any, reference_vectors: Sequence[np.ndarray]) -> float | None:
        """Score previews against pre-embedded references; None when there is no usable reference."""
        if not reference_vectors:
            return None
        per_preview = []
        for img in as_rgb_float_images(previews):
            vec = self.embed(img)
            # A preview where the backend finds nothing (no face while the references have one) has lost the
            # identity: it counts as 0, so a collapse that destroys faces shows up as a likeness drop.
            per_preview.append(0.0 if vec is None else max(self.similarity(vec, r) for r in reference_vectors))
        return float(np.mean(per_preview))

    def score(self, previews: Any, references: Any) -> float | None:
        """Mean over previews of the similarity to the best-matching reference, in [0, 1]; None if unusable."""
        return self.score_embedded(previews, self.embed_references(references))


# --------------------------------------------------------------------------------------------------------------------
# Generic fallback
# --------------------------------------------------------------------------------------------------------------------

STRUCTURE_SIDE = 16  # grey thumbnail side of each crop
CROP_SCALES = (0.8, 0.64)  # besides the whole centre square: a 3×3 grid of crops at 80 % and 64 % of its side
CHROMA_BINS = 8  # bins per axis of the rg-chromaticity histogram
STRUCTURE_WEIGHT = 0.7  # structure vs colour in the generic similarity


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray((np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8))
    return np.asarray(pil.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _centre_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[top : top + side, left : left + side]


def _crop_grid(square: np.ndarray) -> list[np.ndarray]:
    n = square.shape[0]
    crops = [square]
    for scale in CROP_SCALES:
        size = max(1, int(round(n * scale)))
        positions = (0, (n - size) // 2, n - size)
        crops += [square[y : y + size, x : x + size] for y in positions for x in positions]
    return crops


CROP_COUNT = 1 + 9 * len(CROP_SCALES)
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageSimilarityLikeness(LikenessBackend):
    """Generic image similarity with no model and no download, for images without faces (or without the extra).

    Embedding = (a) structure: 19 crops of the centre square (the whole square, and a 3×3 grid of crops at 80 %
    and 64 % of its side), each a 16×16 grey thumbnail standardised to zero mean and unit norm (layout and shape,
    insensitive to brightness and contrast); (b) colour: an 8×8 histogram of rg chromaticity ``(r, g) / (r+g+b)``
    (insensitive to brightness). Similarity = 0.7 × the best cosine between any crop of one image and any crop of
    the other (so a cropped or rescaled copy still matches) + 0.3 × the Bhattacharyya coefficient of the
    histograms. It measures resemblance of whole images, not identity: compare checkpoints of one run with it,
    not runs with each other.
    """

    name = "image"
    label = GENERIC_LABEL

    def __init__(self, reason: str = "") -> None:
        self.reason = reason

    def embed(self, image: Any) -> np.ndarray:
        img = as_rgb_float_images(image)[0]
        thumbs = []
        for crop in _crop_grid(_centre_square(img)):
            grey = (_resize(crop, STRUCTURE_SIDE, STRUCTURE_SIDE) @ _GREY).ravel().astype(np.float64)
            grey -= grey.mean()
            norm = np.linalg.norm(grey)
            thumbs.append(grey / norm if norm > 1e-8 else np.zeros_like(grey))

        small = _resize(img, 64, 64).reshape(-1, 3).astype(np.float64)
        total = small.sum(axis=1)
        keep = total > 0.05  # chromaticity is undefined for black pixels
        if keep.any():
            rg = small[keep, :2] / total[keep, None]
            hist, _, _ = np.histogram2d(rg[:, 0], rg[:, 1], bins=CHROMA_BINS, range=[[0, 1], [0, 1]])
            hist = hist.ravel() / hist.sum()
        else:
            hist = np.zeros(CHROMA_BINS * CHROMA_BINS)
        return np.concatenate([np.concatenate(thumbs), hist])

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        n = CROP_COUNT * STRUCTURE_SIDE * STRUCTURE_SIDE
        crops_a = a[:n].reshape(CROP_COUNT, -1)
        crops_b = b[:n].reshape(CROP_COUNT, -1)
        structure = max(0.0, float(np.max(crops_a @ crops_b.T)))
        colour = float(np.sum(np.sqrt(a[n:] * b[n:])))
        return float(np.clip(STRUCTURE_WEIGHT * structure + (1 - STRUCTURE_WEIGHT) * colour, 0.0, 1.0))


# --------------------------------------------------------------------------------------------------------------------
# Face backend
# --------------------------------------------------------------------------------------------------------------------


def _face_model_files() -> tuple[str, str]:
    """Paths of dlib's 5-point landmark and face-embedding models inside the installed face-recognition-models package.

    Found through the package's location rather than its helper functions: its ``__init__`` imports
    ``pkg_resources``, which recent setuptools no longer ships, so importing it can fail although the files are there.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"face-recognition-models is not installed: {FACE_EXTRA_HINT}")
    models = os.path.join(list(spec.submodule_search_locations)[0], "models")
    pose = os.path.join(models, "shape_predictor_5_face_landmarks.dat")
    embedder = os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat")
    for path in (pose, embedder):
        if not os.path.isfile(path):
            raise ImportError(f"face model file missing: {path}; reinstall with {FACE_EXTRA_HINT}")
    return pose, embedder


def face_backend_available() -> tuple[bool, str]:
    """(True, "") when dlib and the model files are importable, else (False, why)."""
    try:
        import dlib  # noqa: F401
    except ImportError:
        return False, f"dlib is not installed: {FACE_EXTRA_HINT}"
    try:
        _face_model_files()
    except ImportError as exc:
        return False, str(exc)
    return True, ""


class FaceBox(NamedTuple):
    """A detected face: dlib's box in pixels of the image it was found in (it may reach past the image edge),
    and the detector's confidence."""

    left: int
    top: int
    right: int
    bottom: int
    score: float

    @property
    def short_side(self) -> int:
        return min(self.right - self.left, self.bottom - self.top)

    def scaled(self, factor: float) -> "FaceBox":
        """The same box in an image resized by ``factor``."""
        return FaceBox(*(round(v * factor) for v in self[:4]), self.score)


class FaceLikeness(LikenessBackend):
    """Face identity similarity with dlib's embedder (the one ``face_recognition`` uses), weights from PyPI.

    embed: detect faces (HOG; with one upsampling for small images when none is found at native size), keep the
    detection with the highest confidence, align it with the 5 landmarks (the 9 MB predictor; the 68-point one is
    100 MB and slower to load for the same descriptor) and compute the 128-d descriptor.
    similarity = max(0, 1 - Euclidean distance). dlib calls two faces the same person below a distance of 0.6,
    so a similarity above 0.4 means "same person" by its standard tolerance.
    """

    name = "face"
    label = FACE_LABEL

    def __init__(self) -> None:
        import dlib

        pose, embedder = _face_model_files()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(pose)
        self._embedder = dlib.face_recognition_model_v1(embedder)

    def _to_uint8(self, image: Any) -> np.ndarray:
        img = as_rgb_float_images(image)[0]
        h, w = img.shape[:2]
        if max(h, w) > FACE_MAX_SIDE:
            scale = FACE_MAX_SIDE / max(h, w)
            img = _resize(img, max(1, round(w * scale)), max(1, round(h * scale)))
        return np.ascontiguousarray((np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8))

    def detect_faces(self, image: np.ndarray, upsample: int = 0) -> list[FaceBox]:
        """Every face dlib's HOG detector finds in an HxWx3 uint8 image, most confident first.

        ``upsample`` = how many times the detector doubles the image first: 0 finds faces from about 80 px, 1 from
        about 40 px at four times the cost. The dataset identity check and ``find_face`` share this.
        """
        rects, scores, _ = self._detector.run(np.ascontiguousarray(image), upsample, 0.0)
        boxes = [FaceBox(r.left(), r.top(), r.right(), r.bottom(), float(s)) for r, s in zip(rects, scores)]
        return sorted(boxes, key=lambda box: -box.score)

    def descriptor(self, image: np.ndarray, box: FaceBox) -> np.ndarray:
        """The 128-d descriptor of the face in ``box`` of an HxWx3 uint8 image (aligned with the 5 landmarks)."""
        image = np.ascontiguousarray(image)
        rect = self._dlib.rectangle(box.left, box.top, box.right, box.bottom)
        shape = self._shape(image, rect)
        return np.asarray(self._embedder.compute_face_descriptor(image, shape), dtype=np.float64)

    def find_face(self, image: Any) -> tuple[np.ndarray, FaceBox] | None:
        """(uint8 image, most confident face box) or None when no face is found."""
        img = self._to_uint8(image)
        upsamples = (0, 1) if max(img.shape[:2]) < FACE_SMALL_SIDE else (0,)
        for upsample in upsamples:
            boxes = self.detect_faces(img, upsample)
            if boxes:
                return img, boxes[0]
        return None

    def embed(self, image: Any) -> np.ndarray | None:
        found = self.find_face(image)
        if found is None:
            return None
        return self.descriptor(*found)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(max(0.0, 1.0 - np.linalg.norm(a - b)))


# --------------------------------------------------------------------------------------------------------------------
# Choice
# --------------------------------------------------------------------------------------------------------------------

FACE_PROBE_REFERENCES = 4  # how many reference images to check for a face before settling on the face backend


def choose_backend(references: Any = None) -> LikenessBackend:
    """The face backend when the extra is installed and the references show a face; else the labelled fallback.

    Looks at up to 4 references. The returned backend's ``label`` names what was used; a fallback's ``reason``
    says why (extra missing, or no face found).
    """
    available, why = face_backend_available()
    if not available:
        return ImageSimilarityLikeness(reason=why)
    face = FaceLikeness()
    if references is None:
        return face
    images = as_rgb_float_images(references)[:FACE_PROBE_REFERENCES]
    if any(face.find_face(img) is not None for img in images):
        return face
    return ImageSimilarityLikeness(
        reason=f"no face found in the first {len(images)} training image(s); comparing whole images instead"
    )
