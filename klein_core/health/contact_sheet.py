"""The identity check's contact sheet: every image as a thumbnail with its face boxes and flags, the odd ones first.

Images are sorted by face distance to the set, largest first, so a photo of somebody else sits in the top-left
corner; images without a distance (no face, or face checks off) follow by name. A flagged image has a red frame
and its finding kinds in red under it; a clean one a green frame. Thumbnails come from the check itself
(``ImageCheck.thumbnail``), so drawing the sheet decodes nothing again.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_write
from .identity import THUMBNAIL_SIDE, IdentityReport, ImageCheck

PAD = 10  # pixels around and between cells
FONT_SIZE = 13
LINE_HEIGHT = FONT_SIZE + 4
LABEL_LINES = 3  # file name; measurements; finding kinds
MAX_COLUMNS = 8
BACKGROUND = (30, 30, 34)
TEXT = (230, 230, 230)
FLAG = (240, 80, 70)
CLEAN = (90, 200, 120)
FACE_BOX = (255, 220, 0)


def sheet_order(report: IdentityReport) -> list[ImageCheck]:
    """Largest face distance first; images without a distance after them, by name."""
    measured = sorted((i for i in report.images if i.distance is not None), key=lambda i: (-i.distance, i.name))
    rest = sorted((i for i in report.images if i.distance is None), key=lambda i: i.name)
    return measured + rest


def contact_sheet(report: IdentityReport, title: str) -> Image.Image:
    """The sheet as an RGB image: a title line with the verdict, then one cell per image."""
    font = ImageFont.load_default(size=FONT_SIZE)
    images = sheet_order(report)
    columns = max(1, min(MAX_COLUMNS, math.ceil(math.sqrt(len(images))) if images else 1))
    rows = max(1, math.ceil(len(images) / columns))
    cell_w, cell_h = THUMBNAIL_SIDE, THUMBNAIL_SIDE + LABEL_LINES * LINE_HEIGHT
    header = 2 * LINE_HEIGHT + PAD
    sheet = Image.new("RGB", (PAD + columns * (cell_w + PAD), header + PAD + rows * (cell_h + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), _fit(draw, title, sheet.width - 2 * PAD, font), fill=TEXT, font=font)
    verdict = report.verdict() + ("" if report.face_checks else f" ({report.note})")
    draw.text(
        (PAD, PAD + LINE_HEIGHT),
        _fit(draw, verdict, sheet.width - 2 * PAD, font),
        fill=TEXT if report.ready else FLAG,
        font=font,
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        _draw_cell(sheet, draw, font, image, PAD + column * (cell_w + PAD), header + PAD + row * (cell_h + PAD))
    return sheet


def _draw_cell(sheet: Image.Image, draw: ImageDraw.ImageDraw, font, image: ImageCheck, x: int, y: int) -> None:
    thumb = image.thumbnail
    left = x + (THUMBNAIL_SIDE - thumb.width) // 2
    top = y + (THUMBNAIL_SIDE - thumb.height) // 2
    sheet.paste(thumb, (left, top))
    shrink = thumb.width / max(1, round(image.width * image.scale))  # training-scale pixels -> thumbnail pixels
    for box in image.faces:
        scaled = box.scaled(shrink)
        draw.rectangle(
            (left + scaled.left, top + scaled.top, left + scaled.right, top + scaled.bottom), outline=FACE_BOX, width=2
        )
    frame = FLAG if image.findings else CLEAN
    draw.rectangle((left - 2, top - 2, left + thumb.width + 1, top + thumb.height + 1), outline=frame, width=2)
    text_y = y + THUMBNAIL_SIDE + 2
    draw.text((x, text_y), _fit(draw, image.name, THUMBNAIL_SIDE, font), fill=TEXT, font=font)
    draw.text((x, text_y + LINE_HEIGHT), _fit(draw, _measurements(image), THUMBNAIL_SIDE, font), fill=TEXT, font=font)
    kinds = ", ".join(dict.fromkeys(f.kind for f in image.findings)) or "ok"
    draw.text((x, text_y + 2 * LINE_HEIGHT), _fit(draw, kinds, THUMBNAIL_SIDE, font), fill=frame, font=font)


def _measurements(image: ImageCheck) -> str:
    parts = []
    if image.distance is not None:
        parts.append(f"dist {image.distance:.2f}")
    if image.face_px is not None:
        parts.append(f"face {image.face_px}px")
    if image.sharpness is not None:
        parts.append(f"sharp {image.sharpness:.0f}")
    return "  ".join(parts) or f"{image.width}x{image.height}"


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def write_contact_sheet(report: IdentityReport, path: str | Path, title: str) -> Path:
    """Draw the sheet and write it as a PNG at ``path`` (temp file + rename)."""
    sheet = contact_sheet(report, title)
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
