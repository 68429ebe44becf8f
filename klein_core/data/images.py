"""Image files and their decoding: supported extensions, EXIF orientation, every mode to 8-bit RGB (alpha over white,
16-bit scaled), a pixel cap against decompression bombs, and pixels as a tensor."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from ..errors import DatasetError

if TYPE_CHECKING:  # torch is only needed for pixels_from_image; keep `dataset check` light
    import torch

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# 128 Mi pixels (e.g. 16384 x 8192). Far beyond any useful training photo, below Pillow's own hard limit (2 x 89 M),
# and small enough that decoding cannot exhaust memory (~400 MB of RGB).
DEFAULT_MAX_IMAGE_PIXELS = 128 * 1024 * 1024

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def is_image_file(path: str | Path) -> bool:
    """True for a visible file name ending in a supported image extension (any case)."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


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


def decode_reduced_rgb(data: bytes, name: str, width: int, height: int) -> Image.Image:
    """Decode image bytes to upright 8-bit RGB of exactly ``width`` x ``height`` (the upright size wanted), cheaply.

    For checks that look at an image at training scale, not at its full size: a JPEG is decoded at the smallest
    DCT scale (1/2, 1/4 or 1/8) that still covers the wanted size, so a 4000-px photo costs about as much as a
    1000-px one. The file must already have passed ``decode_image_rgb`` (the scan does that); any failure here is
    reported the same way.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the scan applied our own limit
            image = Image.open(io.BytesIO(data))
        orientation = image.getexif().get(0x0112, 1)
        swapped = orientation in (5, 6, 7, 8)  # EXIF rotations by 90 degrees: the stored size is the upright one turned
        image.draft("RGB", (height, width) if swapped else (width, height))
        image = to_rgb(ImageOps.exif_transpose(image))
        return image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    except Exception as exc:  # noqa: BLE001 - anything Pillow raises means this file is unusable now
        raise DatasetError(f"{name}: cannot be decoded any more ({exc}); scan the folder again") from None


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
