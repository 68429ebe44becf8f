"""Real public-domain photos shipped inside PyPI packages (no download at test time), and variations of them.

- scikit-image's ``data.astronaut()``: NASA portrait of astronaut Eileen Collins (public domain).
- matplotlib's ``sample_data/grace_hopper.jpg``: US Navy portrait of Rear Admiral Grace Hopper (public domain).
  Read from the installed package's folder; matplotlib itself is never imported.
- scikit-image's ``data.coffee()``: a cup of coffee (public domain), a photo without a face.

``needs_face`` skips, saying why, a test that needs the face embedder of the ``[likeness]`` extra.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image
from skimage import data

from klein_core.health.likeness import face_backend_available

FACE_AVAILABLE, FACE_MISSING_REASON = face_backend_available()
needs_face = pytest.mark.skipif(
    not FACE_AVAILABLE, reason=f"[likeness] extra not installed, face embedder untestable: {FACE_MISSING_REASON}"
)


def astronaut() -> np.ndarray:
    return data.astronaut()


def grace_hopper() -> np.ndarray:
    spec = importlib.util.find_spec("matplotlib")
    assert spec is not None, "matplotlib (test extra) ships the Grace Hopper photo: pip install -e '.[test]'"
    path = os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "sample_data", "grace_hopper.jpg")
    return np.asarray(Image.open(path).convert("RGB"))


def jitter(image: np.ndarray, box: tuple[int, int, int, int], scale: float, gains, offset: float) -> np.ndarray:
    """Crop to ``box`` (left, top, right, bottom), rescale, then change each channel's gain and the brightness."""
    left, top, right, bottom = box
    crop = Image.fromarray(image[top:bottom, left:right])
    crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BICUBIC)
    out = np.asarray(crop, dtype=np.float32) / 255.0 * np.asarray(gains, dtype=np.float32) + offset
    return np.clip(out, 0.0, 1.0)


def as_pil(image: np.ndarray) -> Image.Image:
    """A float [0, 1] or uint8 HxWx3 array as a PIL image."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(image)


# --------------------------------------------------------------------------------------------------------------
# an identity dataset: one person's jittered crops, and one photo of each kind the identity check must name

ASTRONAUT_CROPS = (  # (left, top, right, bottom), scale, channel gains, brightness offset: one framing each
    ((60, 20, 420, 400), 1.0, (1.1, 0.95, 0.85), 0.04),
    ((0, 0, 400, 512), 1.2, (0.9, 1.0, 1.15), -0.05),
    ((100, 0, 380, 300), 1.5, (1.0, 1.0, 1.0), 0.0),
    ((20, 10, 460, 460), 1.0, (1.05, 1.05, 0.95), 0.02),
    ((120, 30, 340, 260), 2.0, (0.95, 1.0, 1.05), 0.0),
    ((0, 0, 512, 512), 1.0, (1.0, 0.95, 1.0), -0.02),
)
HEAD_BOX = (100, 0, 380, 300)  # the astronaut's head and shoulders


def clean_astronaut_set() -> dict[str, Image.Image]:
    """Six framings of one person under crop, scale and colour jitter: a set the identity check passes."""
    image = astronaut()
    return {f"astronaut_{i}.jpg": as_pil(jitter(image, *crop)) for i, crop in enumerate(ASTRONAUT_CROPS)}


def two_people() -> Image.Image:
    """The astronaut and Grace Hopper side by side: a group shot of two."""
    left = as_pil(astronaut()).crop(HEAD_BOX).resize((300, 320))
    right = as_pil(grace_hopper()).crop((56, 60, 456, 487)).resize((300, 320))
    canvas = Image.new("RGB", (600, 320), (128, 128, 128))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (300, 0))
    return canvas


def tiny_face(canvas_side: int = 1024) -> Image.Image:
    """The astronaut's head at its own size in the middle of a large plain canvas: at a 512 training resolution the
    face is under 64 px (still detected, with the detector's upsampling)."""
    head = as_pil(astronaut()).crop(HEAD_BOX)
    canvas = Image.new("RGB", (canvas_side, canvas_side), (110, 120, 130))
    canvas.paste(head, ((canvas_side - head.width) // 2, (canvas_side - head.height) // 2))
    return canvas


def blurred_face(radius: float = 2.5) -> Image.Image:
    """A mirrored close crop of the astronaut's face (a framing of its own) under a Gaussian blur: found, but soft."""
    from PIL import ImageFilter, ImageOps

    close = as_pil(astronaut()).crop((120, 30, 340, 260)).resize((440, 460))
    return ImageOps.mirror(close).filter(ImageFilter.GaussianBlur(radius))


def near_duplicate(image: Image.Image) -> Image.Image:
    """The same shot again, slightly resized (and re-encoded by whoever saves it): other bytes, same picture."""
    return image.resize((round(image.width * 0.93), round(image.height * 0.93)), Image.Resampling.BICUBIC)


def mixed_identity_set() -> dict[str, tuple[Image.Image, str | None]]:
    """File name -> (image, the finding kind the identity check must name, or None for a clean photo)."""
    clean = clean_astronaut_set()
    photos: dict[str, tuple[Image.Image, str | None]] = {name: (img, None) for name, img in clean.items()}
    photos["other_person.jpg"] = (as_pil(grace_hopper()), "different_person")
    photos["two_people.jpg"] = (two_people(), "several_faces")
    photos["coffee.jpg"] = (as_pil(data.coffee()), "no_face")
    photos["tiny_face.png"] = (tiny_face(), "small_face")
    photos["blurred.jpg"] = (blurred_face(), "blurry")
    photos["zz_again.jpg"] = (near_duplicate(clean["astronaut_3.jpg"]), "near_duplicate")
    return photos


def write_photos(folder, photos) -> None:
    """Save name -> image (or (image, kind)) into ``folder`` (JPEG quality 92 for .jpg)."""
    os.makedirs(folder, exist_ok=True)
    for name, value in photos.items():
        image = value[0] if isinstance(value, tuple) else value
        image.save(os.path.join(folder, name), **({"quality": 92} if name.endswith(".jpg") else {}))
