"""A small synthetic "character" dataset for the demo and the tests: generated on demand, never committed.

One procedurally drawn character, always with the same look (a round face with dark eyes, a **red pointed hat**,
a **yellow scarf** and a **blue body**), is drawn in varied poses, positions, scales and backgrounds. Images are
non-square of several aspect ratios (so aspect buckets are exercised), saved as a PNG/JPEG mix, each with a
same-stem ``.txt`` caption such as ``photo of [trigger], waving on a sunny beach``. Same seed, same bytes.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from ..atomic import atomic_write_bytes
from ..errors import DatasetError
from ..preset import PRESET

SKIN = (241, 200, 160)
HAT_RED = (205, 25, 35)
BODY_BLUE = (30, 70, 200)
SCARF_YELLOW = (250, 205, 30)
INK = (25, 20, 20)
SUPERSAMPLE = 2  # draw at 2x, then downscale: smooth edges without an anti-aliasing renderer

ASPECTS = ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2))
POSES = ("standing", "waving", "with both arms raised", "pointing to the side")


@dataclass(frozen=True)
class _Scene:
    name: str
    caption: str
    draw: Callable[[ImageDraw.ImageDraw, int, int, random.Random], float]  # returns the ground line (0..1 of height)


def _sky_and_ground(draw: ImageDraw.ImageDraw, w: int, h: int, sky: tuple, ground: tuple, horizon: float) -> None:
    draw.rectangle((0, 0, w, int(h * horizon)), fill=sky)
    draw.rectangle((0, int(h * horizon), w, h), fill=ground)


def _park(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> float:
    _sky_and_ground(draw, w, h, (150, 200, 245), (70, 160, 70), 0.62)
    for _ in range(rng.randint(1, 3)):
        x, r = rng.uniform(0.05, 0.95) * w, rng.uniform(0.07, 0.12) * min(w, h)
        draw.rectangle((x - r * 0.2, h * 0.62 - r * 2.2, x + r * 0.2, h * 0.64), fill=(110, 75, 40))
        draw.ellipse((x - r, h * 0.62 - r * 3.4, x + r, h * 0.62 - r * 1.6), fill=(35, 110, 45))
    return 0.9


def _beach(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> float:
    _sky_and_ground(draw, w, h, (120, 190, 250), (235, 215, 160), 0.6)
    draw.rectangle((0, int(h * 0.45), w, int(h * 0.6)), fill=(30, 110, 180))
    sun = rng.uniform(0.1, 0.9) * w
    draw.ellipse((sun - h * 0.06, h * 0.08, sun + h * 0.06, h * 0.2), fill=(255, 240, 120))
    return 0.92


def _city(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> float:
    _sky_and_ground(draw, w, h, (190, 195, 205), (70, 70, 75), 0.7)
    x = 0.0
    while x < w:
        bw, bh = rng.uniform(0.12, 0.25) * w, rng.uniform(0.3, 0.6) * h
        shade = rng.randint(100, 160)
        draw.rectangle((x, h * 0.7 - bh, x + bw, h * 0.7), fill=(shade, shade, shade + 10))
        for wy in range(int(h * 0.7 - bh + 10), int(h * 0.7 - 10), max(8, int(h * 0.06))):
            draw.rectangle((x + bw * 0.2, wy, x + bw * 0.4, wy + h * 0.025), fill=(230, 220, 150))
        x += bw + rng.uniform(0.0, 0.04) * w
    return 0.95


def _room(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> float:
    _sky_and_ground(draw, w, h, (225, 205, 170), (140, 95, 60), 0.68)
    x = rng.uniform(0.1, 0.6) * w
    draw.rectangle((x, h * 0.15, x + w * 0.28, h * 0.45), fill=(170, 215, 245), outline=(250, 250, 250), width=6)
    return 0.93


def _night(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> float:
    _sky_and_ground(draw, w, h, (15, 20, 60), (30, 45, 40), 0.7)
    for _ in range(40):
        x, y = rng.uniform(0, w), rng.uniform(0, h * 0.65)
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(255, 255, 230))
    mx = rng.uniform(0.1, 0.9) * w
    draw.ellipse((mx - h * 0.06, h * 0.06, mx + h * 0.06, h * 0.18), fill=(245, 245, 210))
    return 0.92


def _studio(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> float:
    top = (rng.randint(180, 240), rng.randint(180, 240), rng.randint(180, 240))
    for y in range(h):
        t = y / h
        draw.line((0, y, w, y), fill=tuple(int(c * (1 - 0.35 * t)) for c in top))
    return 0.9


def _snow(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> float:
    _sky_and_ground(draw, w, h, (200, 215, 230), (245, 248, 252), 0.6)
    for _ in range(60):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(255, 255, 255))
    return 0.9


SCENES = (
    _Scene("park", "in a park", _park),
    _Scene("beach", "on a sunny beach", _beach),
    _Scene("city", "on a city street", _city),
    _Scene("room", "in a cozy room", _room),
    _Scene("night", "outdoors at night under the stars", _night),
    _Scene("studio", "against a plain studio backdrop", _studio),
    _Scene("snow", "in the snow", _snow),
)


def _draw_character(draw: ImageDraw.ImageDraw, cx: float, ground: float, unit: float, pose: str, facing: int) -> None:
    """Draw the character with its feet at (cx, ground); ``unit`` is 1/10 of its height."""
    u = unit
    line = max(2, int(u * 0.45))
    hip_y, shoulder_y, neck_y = ground - 3.2 * u, ground - 6.4 * u, ground - 6.9 * u
    head_r, head_y = 1.35 * u, ground - 8.0 * u
    # legs
    for side in (-1, 1):
        draw.line((cx + side * 0.5 * u, hip_y, cx + side * 0.9 * u, ground), fill=INK, width=line)
        foot_x = cx + side * 0.9 * u
        draw.ellipse((foot_x - 0.5 * u, ground - 0.25 * u, foot_x + 0.5 * u, ground + 0.2 * u), fill=INK)
    # arms: (angle of each arm in degrees, 0 = straight down, positive = outwards and up)
    angles = {
        "standing": (20, 20),
        "waving": (20, 150),
        "with both arms raised": (155, 155),
        "pointing to the side": (20, 90),
    }[pose]
    for side, angle in zip((-facing, facing), angles):
        rad = math.radians(angle)
        hx, hy = cx + side * (1.1 * u + math.sin(rad) * 2.6 * u), shoulder_y + math.cos(rad) * 2.6 * u
        draw.line((cx + side * 1.1 * u, shoulder_y + 0.3 * u, hx, hy), fill=BODY_BLUE, width=int(line * 1.6))
        draw.ellipse((hx - 0.4 * u, hy - 0.4 * u, hx + 0.4 * u, hy + 0.4 * u), fill=SKIN)
    # body
    draw.rounded_rectangle((cx - 1.4 * u, shoulder_y, cx + 1.4 * u, hip_y + 0.3 * u), radius=0.6 * u, fill=BODY_BLUE)
    draw.rectangle((cx - 1.3 * u, neck_y, cx + 1.3 * u, shoulder_y + 0.4 * u), fill=SCARF_YELLOW)
    # head and face
    draw.ellipse((cx - head_r, head_y - head_r, cx + head_r, head_y + head_r), fill=SKIN)
    for side in (-1, 1):
        ex = cx + side * 0.5 * u + facing * 0.15 * u
        draw.ellipse((ex - 0.17 * u, head_y - 0.35 * u, ex + 0.17 * u, head_y + 0.05 * u), fill=INK)
    draw.arc((cx - 0.6 * u, head_y - 0.1 * u, cx + 0.6 * u, head_y + 0.75 * u), 20, 160, fill=(150, 40, 40), width=line)
    # red pointed hat with a brim
    brim_y = head_y - 0.75 * head_r
    draw.polygon(
        [(cx - 1.05 * head_r, brim_y), (cx + 1.05 * head_r, brim_y), (cx + facing * 0.4 * u, brim_y - 2.6 * u)],
        fill=HAT_RED,
    )
    brim = (cx - 1.5 * head_r, brim_y - 0.2 * u, cx + 1.5 * head_r, brim_y + 0.25 * u)
    draw.rounded_rectangle(brim, radius=0.2 * u, fill=HAT_RED)


def render_sample(index: int, seed: int = 0, size: int = 384) -> tuple[Image.Image, str]:
    """Image ``index`` of the set for ``seed`` and its caption (with the ``[trigger]`` placeholder)."""
    rng = random.Random(f"klein-sample:{seed}:{index}")
    aw, ah = ASPECTS[(index + seed) % len(ASPECTS)]
    long_side = size
    width, height = (long_side, long_side * ah // aw) if aw >= ah else (long_side * aw // ah, long_side)
    width, height = width // 16 * 16, height // 16 * 16  # tidy sizes; buckets still differ by aspect
    scene = SCENES[(index * 3 + seed) % len(SCENES)]
    pose = POSES[(index + seed // 2) % len(POSES)]
    close_up = index % 5 == 3
    big_w, big_h = width * SUPERSAMPLE, height * SUPERSAMPLE
    canvas = Image.new("RGB", (big_w, big_h))
    draw = ImageDraw.Draw(canvas)
    ground_frac = scene.draw(draw, big_w, big_h, rng)
    if close_up:
        unit = big_h * 0.1  # hat, face and body fill the frame; the legs are below it
        ground = big_h * 1.22
    else:
        unit = big_h * rng.uniform(0.055, 0.08)
        ground = big_h * (ground_frac - rng.uniform(0.0, 0.06))
    margin = 3.5 * unit
    cx = rng.uniform(min(margin, big_w / 2), max(big_w - margin, big_w / 2))
    _draw_character(draw, cx, ground, unit, pose, facing=rng.choice((-1, 1)))
    image = canvas.resize((width, height), Image.Resampling.LANCZOS)
    framing = "close-up photo of" if close_up else "photo of"
    return image, f"{framing} {PRESET.trigger_placeholder}, {pose} {scene.caption}"


def sample_file_names(count: int) -> list[tuple[str, str]]:
    """(image name, caption name) of each sample: PNG and JPEG alternate."""
    return [(f"sample_{i:02d}.{'png' if i % 2 == 0 else 'jpg'}", f"sample_{i:02d}.txt") for i in range(count)]


def claim_dataset_folder(folder: str | Path, names: list[tuple[str, str]], what: str) -> Path:
    """``folder``, created if needed, for a generated ``what`` of these (image, caption) file ``names``.

    Refused when it holds anything else (a previous set of the same names is overwritten), so a generated set never
    mixes into a user's dataset.
    """
    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} exists and is not a folder")
    ours = {name for pair in names for name in pair}
    foreign = sorted(p.name for p in root.iterdir() if p.name not in ours) if root.is_dir() else []
    if foreign:
        raise DatasetError(
            f"{root} already holds other files ({', '.join(foreign[:3])}…): give a new or empty folder for the {what}"
        )
    root.mkdir(parents=True, exist_ok=True)
    return root


def make_sample_dataset(
    folder: str | Path,
    count: int = 10,
    seed: int = 0,
    trigger: str = "kleinchar",
    size: int = 384,
) -> list[Path]:
    """Write ``count`` images and captions into ``folder`` (created if needed); return the image paths.

    Refuses a folder holding anything but a previous sample set, so it never mixes into a user's dataset.
    ``trigger`` is not written into the files (captions keep ``[trigger]``); it only names the word the demo uses.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1000:
        raise DatasetError(f"count must be a whole number from 1 to 1000, got {count!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 64:
        raise DatasetError(f"size must be a whole number of pixels >= 64, got {size!r}")
    del trigger  # captions carry the placeholder, so the same set serves any trigger word
    names = sample_file_names(count)
    root = claim_dataset_folder(folder, names, "sample dataset")
    paths: list[Path] = []
    for index, (image_name, caption_name) in enumerate(names):
        image, caption = render_sample(index, seed=seed, size=size)
        buffer = io.BytesIO()
        if image_name.endswith(".png"):
            image.save(buffer, format="PNG", optimize=False)
        else:
            image.save(buffer, format="JPEG", quality=92)
        paths.append(atomic_write_bytes(root / image_name, buffer.getvalue()))
        atomic_write_bytes(root / caption_name, (caption + "\n").encode("utf-8"))
    return paths
