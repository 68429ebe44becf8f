"""Preview image statistics: saturation, clipping, high-frequency noise and colour collapse of a rendered preview,
the numbers the preview blow-out signal compares across checkpoints. Pure numpy."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from .json_floats import float_from_json, float_to_json

CLIP_LOW = 0.5 / 255.0
CLIP_HIGH = 254.5 / 255.0
WHITE_NOISE_LAPLACIAN_GAIN = 20.0  # E[lap(x)^2] / Var(x) for i.i.d. pixels with the 4-neighbour Laplacian (16 + 4)
DOMINANT_COLOUR_LEVELS = 4  # bins per RGB channel for the dominant-colour share (4^3 = 64 colour bins)


@dataclass(frozen=True)
class PreviewStats:
    """Summary statistics of a checkpoint's preview images (mean over the images).

    Each one is chosen to move a lot when a diffusion LoRA collapses and little when it merely learns a face:

    - ``clipped_fraction``: share of pixels with any channel at 0 or 1 (within half a level of 8-bit):
      blown-out highlights, crushed blacks, neon colours. 0 = none, 1 = every pixel.
    - ``mean_saturation``: mean HSV saturation, ``(max - min) / max`` per pixel (0 for black). Collapsed previews
      often turn oversaturated.
    - ``high_frequency_energy``: mean squared 4-neighbour Laplacian of the grey image divided by 20 × its variance.
      About 1 for white noise, near 0 for smooth photos: the share of the image's energy in pixel-level noise.
    - ``colour_std``: mean over R, G, B of each channel's standard deviation across pixels (0 = a flat image,
      about 0.2-0.3 for a photo). A collapse to one flat colour drives it to 0.
    - ``dominant_colour_fraction``: share of pixels in the most populated of 64 coarse RGB bins (4 levels per
      channel). 1.0 means a single colour fills the image.
    """

    clipped_fraction: float
    mean_saturation: float
    high_frequency_energy: float
    colour_std: float
    dominant_colour_fraction: float
    image_count: int = 1

    def as_dict(self) -> dict:
        return {k: (float_to_json(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "PreviewStats":
        return cls(
            clipped_fraction=float(float_from_json(data["clipped_fraction"])),
            mean_saturation=float(float_from_json(data["mean_saturation"])),
            high_frequency_energy=float(float_from_json(data["high_frequency_energy"])),
            colour_std=float(float_from_json(data["colour_std"])),
            dominant_colour_fraction=float(float_from_json(data["dominant_colour_fraction"])),
            image_count=int(data.get("image_count", 1)),
        )


def as_rgb_float_images(images: Any) -> list[np.ndarray]:
    """Turn previews into a list of float32 HxWx3 arrays in [0, 1].

    Accepts a PIL image, an array (HxW, HxWx3/4 or a BxHxWxC batch such as ComfyUI's IMAGE tensor on CPU), or a
    sequence of those. uint8 arrays are divided by 255; float arrays are taken as [0, 1] and clipped.
    """
    if _is_single_image(images):
        items: Iterable[Any] = [images]
    else:
        items = images
    out: list[np.ndarray] = []
    for item in items:
        if hasattr(item, "convert") and hasattr(item, "size") and not isinstance(item, np.ndarray):  # PIL image
            arr = np.asarray(item.convert("RGB"), dtype=np.float32) / 255.0
            out.append(arr)
            continue
        arr = _to_numpy(item)
        if arr.ndim == 4:
            out.extend(as_rgb_float_images(list(arr)))
            continue
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        else:
            arr = np.clip(np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"preview image must be HxW, HxWx3 or HxWx4, got shape {tuple(arr.shape)}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        out.append(np.ascontiguousarray(arr[..., :3]))
    if not out:
        raise ValueError("no preview images given")
    return out


def _to_numpy(item: Any) -> np.ndarray:
    if hasattr(item, "detach"):  # a torch tensor, without importing torch here
        item = item.detach().to("cpu").float().numpy()
    return np.asarray(item)


def _is_single_image(images: Any) -> bool:
    if hasattr(images, "convert") and hasattr(images, "size") and not isinstance(images, np.ndarray):
        return True
    if isinstance(images, np.ndarray) or hasattr(images, "detach"):
        return True  # one image or one batch: both handled by the array branch
    return False


def laplacian(grey: np.ndarray) -> np.ndarray:
    """The 4-neighbour Laplacian of a 2-D array (one pixel smaller on each side): high where detail is; the
    preview noise statistic and the dataset check's face sharpness both measure with it."""
    return 4.0 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]


def _single_image_stats(img: np.ndarray) -> tuple[float, float, float, float, float]:
    clipped = ((img <= CLIP_LOW) | (img >= CLIP_HIGH)).any(axis=-1).mean()

    cmax = img.max(axis=-1)
    cmin = img.min(axis=-1)
    saturation = np.where(cmax > 1e-6, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0).mean()

    grey = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if grey.shape[0] >= 3 and grey.shape[1] >= 3:
        lap = laplacian(grey)
        variance = float(grey.var())
        energy = float((lap.astype(np.float64) ** 2).mean())
        hf = energy / (WHITE_NOISE_LAPLACIAN_GAIN * variance) if variance > 1e-10 else 0.0
    else:
        hf = 0.0

    colour_std = float(img.reshape(-1, 3).std(axis=0).mean())

    levels = DOMINANT_COLOUR_LEVELS
    q = np.minimum((img * levels).astype(np.int64), levels - 1)
    codes = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    dominant = np.bincount(codes.ravel(), minlength=levels**3).max() / codes.size

    return float(clipped), float(saturation), hf, colour_std, float(dominant)


def preview_statistics(images: Any) -> PreviewStats:
    """Compute :class:`PreviewStats` over one checkpoint's previews (mean of the per-image statistics)."""
    arrays = as_rgb_float_images(images)
    per_image = np.array([_single_image_stats(a) for a in arrays], dtype=np.float64)
    mean = per_image.mean(axis=0)
    return PreviewStats(
        clipped_fraction=float(mean[0]),
        mean_saturation=float(mean[1]),
        high_frequency_energy=float(mean[2]),
        colour_std=float(mean[3]),
        dominant_colour_fraction=float(mean[4]),
        image_count=len(arrays),
    )
