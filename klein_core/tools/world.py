"""The generated world the pre-trained tiny Klein knows: drawn characters with a hat, a scarf and a body.

Each part is one of eight colours; pose, facing, scale, position and background vary. A caption names the three
colours in a fixed order (``photo of a character with a green hat, a red scarf and a blue body``), so a text-to-image
model trained on the world can be asked for a combination, and a part-colour reader can check that it drew it.

The demo's identity, ``kleinchar``, is a combination the world never draws (pink hat, green scarf, orange body) with a
mark the world never has (a white star on the body): without its LoRA the base can only draw "some character".
Same seed, same images: every draw comes from a ``random.Random`` seeded with a string.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..atomic import atomic_write_bytes
from ..preset import PRESET
from .sample_data import claim_dataset_folder

COLOURS = {  # the RGB cube's corners: guidance pushes a colour away from the average picture, and a corner stays
    # itself when pushed further out (in-between colours did not: at CFG 4 pink was drawn in 14% of samples, purple
    # in 24%, orange in 54%, blue and white in 100%)
    "red": (225, 20, 20),
    "yellow": (240, 225, 20),
    "green": (20, 190, 40),
    "cyan": (20, 215, 230),
    "blue": (25, 40, 225),
    "magenta": (225, 30, 215),
    "white": (248, 248, 248),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
PARTS = ("hat", "scarf", "body")
SKIN = (236, 196, 158)
INK = (30, 24, 24)
SUPERSAMPLE = 4  # draw at 4x, then downscale: smooth edges without an anti-aliasing renderer
POSES = ("standing", "waving", "arms raised", "pointing")
ARM_ANGLES = {"standing": (20, 20), "waving": (20, 150), "arms raised": (155, 155), "pointing": (20, 90)}


@dataclass(frozen=True)
class Look:
    """What a character looks like: one colour name per part, and whether it wears the identity's star mark."""

    hat: str
    scarf: str
    body: str
    star: bool = False

    @property
    def colours(self) -> tuple[str, str, str]:
        return (self.hat, self.scarf, self.body)

    def caption(self) -> str:
        return f"photo of a character with a {self.hat} hat, a {self.scarf} scarf and a {self.body} body"


IDENTITY = Look("magenta", "cyan", "yellow", star=True)  # the demo's kleinchar: never drawn by the world


def world_look(rng: random.Random) -> Look:
    """A random look of the world: any three colours except the identity's combination."""
    while True:
        look = Look(*(rng.choice(COLOUR_NAMES) for _ in PARTS))
        if look.colours != IDENTITY.colours:
            return look


def _tint(rng: random.Random, base: tuple, spread: int = 25) -> tuple:
    return tuple(max(0, min(255, c + rng.randint(-spread, spread))) for c in base)


def _background(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    """One of five muted backgrounds: studio gradient, sky over grass, wall over floor, night sky, beach."""
    kind = rng.randrange(5)
    horizon = int(size * rng.uniform(0.6, 0.8))
    if kind == 0:
        top = _tint(rng, (200, 200, 205), 35)
        for y in range(size):
            draw.line((0, y, size, y), fill=tuple(int(c * (1 - 0.4 * y / size)) for c in top))
        return
    sky, ground = [
        ((150, 195, 240), (80, 150, 75)),
        ((215, 195, 165), (130, 90, 60)),
        ((20, 25, 65), (35, 45, 40)),
        ((120, 185, 245), (230, 210, 160)),
    ][kind - 1]
    draw.rectangle((0, 0, size, horizon), fill=_tint(rng, sky))
    draw.rectangle((0, horizon, size, size), fill=_tint(rng, ground))
    if kind == 3:
        for _ in range(30):
            x, y = rng.uniform(0, size), rng.uniform(0, horizon)
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(250, 250, 225))


def _star(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float) -> None:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        angle = math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(angle), cy - r * math.sin(angle)))
    draw.polygon(points, fill=(255, 255, 255), outline=INK)


def _character(
    draw: ImageDraw.ImageDraw, look: Look, cx: float, ground: float, u: float, pose: str, facing: int
) -> None:
    """Draw ``look`` with its feet at (cx, ground); ``u`` is a tenth of its height.

    Chunky on purpose: a wide cone hat, a scarf as broad as a collar, a wide body, each part a similar share of the
    picture. With a thin scarf and a narrow hat (each a few pixels at 64 px) the pre-trained Base drew the prompted
    body colour in 73% of samples but the hat in 15% and the scarf in 23% (chance 12.5%): too few pixels for the
    loss to care. At these proportions the same training drew 60%, 73% and 71%."""
    hat, scarf, body = (COLOURS[c] for c in look.colours)
    line = max(2, int(u * 0.5))
    hip_y, shoulder_y, neck_y = ground - 3.0 * u, ground - 6.2 * u, ground - 7.2 * u
    head_r, head_y = 1.4 * u, ground - 8.3 * u
    for side in (-1, 1):
        draw.line((cx + side * 0.5 * u, hip_y, cx + side * 0.9 * u, ground), fill=INK, width=line)
    for side, angle in zip((-facing, facing), ARM_ANGLES[pose]):
        rad = math.radians(angle)
        hx, hy = cx + side * (1.3 * u + math.sin(rad) * 2.4 * u), shoulder_y + 0.4 * u + math.cos(rad) * 2.4 * u
        draw.line((cx + side * 1.3 * u, shoulder_y + 0.4 * u, hx, hy), fill=body, width=int(line * 1.8))
        draw.ellipse((hx - 0.45 * u, hy - 0.45 * u, hx + 0.45 * u, hy + 0.45 * u), fill=SKIN)
    draw.rounded_rectangle(
        (cx - 2.0 * u, shoulder_y, cx + 2.0 * u, hip_y + 0.3 * u),
        radius=0.6 * u,
        fill=body,
        outline=INK,
        width=max(1, line // 2),
    )
    scarf_bottom = shoulder_y + 1.4 * u
    if look.star:  # on the body below the scarf
        _star(draw, cx, (scarf_bottom + hip_y + 0.3 * u) / 2, 0.9 * u)
    draw.rectangle(
        (cx - 2.2 * u, neck_y - 0.3 * u, cx + 2.2 * u, scarf_bottom), fill=scarf, outline=INK, width=max(1, line // 2)
    )
    draw.ellipse((cx - head_r, head_y - head_r, cx + head_r, head_y + head_r), fill=SKIN)
    for side in (-1, 1):
        ex = cx + side * 0.5 * u + facing * 0.2 * u
        draw.ellipse((ex - 0.2 * u, head_y - 0.4 * u, ex + 0.2 * u, head_y + 0.05 * u), fill=INK)
    brim_y = head_y - 0.7 * head_r
    draw.polygon(
        [(cx - 1.6 * head_r, brim_y), (cx + 1.6 * head_r, brim_y), (cx + facing * 0.5 * u, brim_y - 3.0 * u)],
        fill=hat,
        outline=INK,
    )
    draw.rounded_rectangle(
        (cx - 2.0 * head_r, brim_y - 0.45 * u, cx + 2.0 * head_r, brim_y + 0.55 * u),
        radius=0.2 * u,
        fill=hat,
        outline=INK,
    )


def render(look: Look, rng: random.Random, size: int = 64) -> Image.Image:
    """One ``size`` x ``size`` picture of ``look`` in a random pose, scale, position and background."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(canvas)
    _background(draw, big, rng)
    unit = big * rng.uniform(0.068, 0.088)  # the character is 75-95% of the picture's height
    ground = big * rng.uniform(0.93, 0.98)
    cx = big * rng.uniform(0.5 - 0.2, 0.5 + 0.2)
    _character(draw, look, cx, ground, unit, rng.choice(POSES), facing=rng.choice((-1, 1)))
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def world_sample(index: int, seed: int, size: int = 64) -> tuple[Image.Image, Look]:
    """Picture ``index`` of the world drawn from ``seed`` (a random look, pose, scale and background)."""
    rng = random.Random(f"klein-world:{seed}:{index}")
    look = world_look(rng)
    return render(look, rng, size), look


def identity_file_names(count: int) -> list[tuple[str, str]]:
    """(image name, caption name) of each identity picture: PNG and JPEG alternate."""
    return [(f"kleinchar_{i:02d}.{'png' if i % 2 == 0 else 'jpg'}", f"kleinchar_{i:02d}.txt") for i in range(count)]


def make_identity_dataset(folder: str | Path, count: int = 4, seed: int = 0, size: int = 128) -> list[Path]:
    """Write ``count`` pictures of the identity (square, ``size`` px) with ``photo of [trigger]`` captions.

    Refuses a folder holding anything but a previous identity set, so it never mixes into a user's dataset.
    """
    names = identity_file_names(count)
    root = claim_dataset_folder(folder, names, "identity dataset")
    paths = []
    for index, (image_name, caption_name) in enumerate(names):
        image = render(IDENTITY, random.Random(f"klein-identity:{seed}:{index}"), size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if image_name.endswith(".png") else "JPEG", quality=95)
        paths.append(atomic_write_bytes(root / image_name, buffer.getvalue()))
        atomic_write_bytes(root / caption_name, f"{PRESET.default_caption}\n".encode("utf-8"))
    return paths
