"""The dataset layer: scanning a messy folder, decoding every image kind, buckets, caption dropout, batching.

Every broken file is made in tmp_path by the test that needs it.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from klein_core.data.buckets import (
    Bucket,
    BucketBatchSampler,
    bucket_for,
    buckets_for,
    fit_to_bucket,
    parse_resolutions,
)
from klein_core.data.captions import CaptionDropout, apply_caption_dropout, apply_trigger_policy, substitute_trigger
from klein_core.data.images import IMAGE_EXTENSIONS, decode_image_rgb, is_image_file, load_image_rgb, pixels_from_image
from klein_core.data.scan import bucket_pixels, dataset_folders, folder_signature, inspect_dataset, scan_dataset
from klein_core.data.spec import DatasetSpec, changed_fingerprint_parts, dataset_fingerprint, fingerprint_parts
from klein_core.errors import DatasetError
from klein_core.preset import PRESET

TRIGGER = "kleinchar"
SMALL = (128,)  # a resolution at which the small test images need no upscaling warning


def save_image(path: Path, size=(160, 160), color=(200, 60, 40), mode="RGB", **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_args)
    return path


def write_caption(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every entry below ``folder`` with the sha256 of its bytes and its mtime."""
    state = {}
    for path in sorted(folder.rglob("*")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(folder))] = (digest, path.stat().st_mtime_ns)
    return state


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (the shape of a decompression bomb) with next to no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ds"
    save_image(folder / "b.png", (300, 200))
    save_image(folder / "a.jpg", (200, 300), color=(10, 120, 220))
    save_image(folder / "c.webp", (256, 256), color=(30, 200, 30))
    write_caption(folder / "a.txt", "photo of [trigger], smiling")
    return folder


# ---------------------------------------------------------------- scanning: files, order, captions


def test_supported_extensions_are_matched_case_insensitively_and_hidden_files_are_not_images():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
    for name in ("x.jpg", "x.JPEG", "x.Png", "x.webp", "x.BMP"):
        assert is_image_file(name), name
    for name in ("x.gif", "x.txt", "x.tiff", "._x.jpg", ".hidden.png", "jpg"):
        assert not is_image_file(name), name


def test_every_supported_format_is_scanned_in_file_name_order(tmp_path: Path):
    folder = tmp_path / "ds"
    save_image(folder / "d.BMP", (128, 128))
    save_image(folder / "b.JPEG", (128, 128))
    save_image(folder / "a.png", (128, 128))
    save_image(folder / "e.webp", (128, 128))
    save_image(folder / "c.Jpg", (128, 128))
    scan = scan_dataset(folder, TRIGGER, resolutions=(64,))
    assert [i.name for i in scan.items] == ["a.png", "b.JPEG", "c.Jpg", "d.BMP", "e.webp"]
    assert [i.name for i in scan_dataset(folder, TRIGGER, resolutions=(64,)).items] == [i.name for i in scan.items]


def test_same_stem_txt_gives_the_caption_and_other_images_get_the_default(good_folder: Path):
    scan = scan_dataset(good_folder, TRIGGER)
    captions = {i.name: (i.caption, i.caption_source) for i in scan.items}
    assert captions["a.jpg"] == ("photo of kleinchar, smiling", "file")
    assert captions["b.png"] == ("photo of kleinchar", "default")
    assert captions["c.webp"] == ("photo of kleinchar", "default")
    assert PRESET.default_caption == "photo of [trigger]"


def test_a_custom_default_caption_is_used_with_the_trigger_substituted(good_folder: Path):
    scan = scan_dataset(good_folder, TRIGGER, default_caption="a portrait of [TRIGGER] outdoors")
    assert scan.items[1].caption == "a portrait of kleinchar outdoors"


def test_caption_whitespace_and_line_breaks_collapse(tmp_path: Path):
    save_image(tmp_path / "x.png")
    write_caption(tmp_path / "x.txt", "  photo of [trigger],\n\n  in a   park \n")
    assert scan_dataset(tmp_path, TRIGGER).items[0].caption == "photo of kleinchar, in a park"


def test_trigger_placeholder_is_replaced_in_any_case_and_in_preview_prompts():
    assert substitute_trigger("[trigger] and [Trigger] on [TRIGGER]", "ohwx") == "ohwx and ohwx on ohwx"
    assert substitute_trigger("a photo of [trigger] at the beach", "kleinchar") == "a photo of kleinchar at the beach"


def test_caption_lacking_the_trigger_gets_it_prepended_by_default(tmp_path: Path):
    save_image(tmp_path / "x.png")
    write_caption(tmp_path / "x.txt", "a man standing in a park")
    scan = scan_dataset(tmp_path, TRIGGER, resolutions=SMALL)
    assert scan.items[0].caption == "kleinchar, a man standing in a park"
    assert not scan.warnings


def test_trigger_policy_append_and_keep(tmp_path: Path):
    save_image(tmp_path / "x.png")
    write_caption(tmp_path / "x.txt", "a man standing in a park")
    assert scan_dataset(tmp_path, TRIGGER, trigger_policy="append").items[0].caption == (
        "a man standing in a park, kleinchar"
    )
    kept = scan_dataset(tmp_path, TRIGGER, trigger_policy="keep")
    assert kept.items[0].caption == "a man standing in a park"
    assert any("x.png" in p.message and "keep" in p.message for p in kept.warnings)
    with pytest.raises(DatasetError, match="trigger_policy.*'sideways'"):
        scan_dataset(tmp_path, TRIGGER, trigger_policy="sideways")


def test_a_regularization_set_keeps_class_captions_and_refuses_any_that_carry_the_trigger(tmp_path: Path):
    from klein_core.data.spec import DatasetSpec

    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png", color=(20, 90, 160))
    write_caption(tmp_path / "b.txt", "photo of [trigger] at the beach")
    # the class folder's own trigger is not the identity's: the identity's word is the one that must stay out
    spec = DatasetSpec(folder=str(tmp_path), trigger="someone", resolutions=SMALL, default_caption="photo of a person")
    regularization = spec.as_regularization(TRIGGER)
    assert (regularization.trigger, regularization.trigger_policy, regularization.caption_dropout) == (
        TRIGGER,
        "exclude",
        0.0,
    )
    with pytest.raises(
        DatasetError, match=r"1 regularization captions contain the trigger 'kleinchar': b.png.*photo of a person"
    ):
        regularization.scan()
    (tmp_path / "b.txt").unlink()
    scan = regularization.scan()
    assert [item.caption for item in scan.items] == ["photo of a person", "photo of a person"]  # no trigger added
    assert not scan.warnings


def test_trigger_counts_only_as_a_whole_word_with_its_exact_spelling():
    assert apply_trigger_policy("kleinchar, smiling", TRIGGER) == "kleinchar, smiling"
    assert apply_trigger_policy("kleincharacter smiling", TRIGGER) == "kleinchar, kleincharacter smiling"
    assert apply_trigger_policy("Kleinchar smiling", TRIGGER) == "kleinchar, Kleinchar smiling"
    assert apply_trigger_policy("", TRIGGER) == TRIGGER


def test_empty_caption_file_uses_the_default_caption_with_a_warning(tmp_path: Path):
    save_image(tmp_path / "x.png")
    write_caption(tmp_path / "x.txt", " \n ")
    scan = scan_dataset(tmp_path, TRIGGER, resolutions=SMALL)
    assert scan.items[0].caption == "photo of kleinchar"
    assert [p.file for p in scan.warnings] == ["x.txt"]


def test_utf8_caption_with_byte_order_mark_and_non_ascii_text_is_read(tmp_path: Path):
    save_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes("\ufeffphoto of [trigger], café in Zürich".encode("utf-8"))
    assert scan_dataset(tmp_path, TRIGGER).items[0].caption == "photo of kleinchar, café in Zürich"


# ---------------------------------------------------------------- scanning: bad input


@pytest.mark.parametrize("trigger", ["", "   ", None, "[trigger]", "two\nlines"])
def test_missing_or_unusable_trigger_word_is_an_error(good_folder: Path, trigger):
    with pytest.raises(DatasetError, match="trigger"):
        scan_dataset(good_folder, trigger)


def test_folder_not_found_is_an_error_naming_it(tmp_path: Path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DatasetError, match="not found.*no_such_folder"):
        scan_dataset(missing, TRIGGER)
    save_image(tmp_path / "file.png")
    with pytest.raises(DatasetError, match="not a folder.*file.png"):
        scan_dataset(tmp_path / "file.png", TRIGGER)


def test_empty_folder_is_an_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images in .*empty.*no files"):
        scan_dataset(tmp_path / "empty", TRIGGER)


def test_folder_with_only_non_images_is_an_error_that_counts_them(tmp_path: Path):
    (tmp_path / "notes.md").write_text("hi")
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    with pytest.raises(DatasetError, match=r"only non-image files \(2\)"):
        scan_dataset(tmp_path, TRIGGER)


def test_non_image_files_hidden_files_and_subfolders_are_ignored_and_counted(good_folder: Path):
    (good_folder / "notes.md").write_text("x")
    (good_folder / ".DS_Store").write_bytes(b"\0\0")
    (good_folder / "._a.jpg").write_bytes(b"\0\5\x16\7")  # macOS resource fork: not an image
    save_image(good_folder / "more" / "d.png")
    scan = scan_dataset(good_folder, TRIGGER)
    assert len(scan.items) == 3
    assert scan.ignored == (".DS_Store", "._a.jpg", "more/", "notes.md")
    assert "ignored 4 non-image entries" in scan.summary()


def test_truncated_jpeg_is_an_error_naming_the_file(good_folder: Path):
    save_image(good_folder / "broken.jpg", (400, 300), color=(90, 90, 90), quality=95)
    data = (good_folder / "broken.jpg").read_bytes()
    (good_folder / "broken.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"broken\.jpg: corrupt or truncated"):
        scan_dataset(good_folder, TRIGGER)


def test_garbage_with_an_image_extension_is_an_error_naming_the_file(good_folder: Path):
    (good_folder / "fake.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DatasetError, match=r"fake\.png: not a readable image"):
        scan_dataset(good_folder, TRIGGER)


def test_corrupt_images_are_skipped_with_a_warning_when_the_user_opts_in(good_folder: Path):
    (good_folder / "fake.png").write_bytes(b"this is not a png at all")
    write_caption(good_folder / "fake.txt", "photo of [trigger]")
    scan = scan_dataset(good_folder, TRIGGER, skip_corrupt=True, resolutions=SMALL)
    assert [i.name for i in scan.items] == ["a.jpg", "b.png", "c.webp"]
    assert scan.skipped == ("fake.png",)
    assert [(p.file, p.message.startswith("skipped")) for p in scan.warnings] == [("fake.png", True)]


def test_a_folder_whose_images_are_all_skipped_is_still_an_error(tmp_path: Path):
    (tmp_path / "fake.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="every image was skipped"):
        scan_dataset(tmp_path, TRIGGER, skip_corrupt=True)


def test_caption_that_is_not_utf8_is_an_error_naming_the_file(good_folder: Path):
    (good_folder / "b.txt").write_bytes("photo of [trigger], caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"b\.txt: caption is not UTF-8 \(byte 0xe9 at offset 23\)"):
        scan_dataset(good_folder, TRIGGER)


def test_every_error_is_reported_at_once(good_folder: Path):
    (good_folder / "fake.png").write_bytes(b"nope")
    (good_folder / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DatasetError, match="2 problems") as info:
        scan_dataset(good_folder, TRIGGER)
    assert "fake.png" in str(info.value) and "b.txt" in str(info.value)


def test_orphan_caption_is_a_warning_and_ignored(good_folder: Path):
    write_caption(good_folder / "zz_orphan.txt", "photo of [trigger]")
    scan = scan_dataset(good_folder, TRIGGER, resolutions=SMALL)
    assert [(p.file, "orphan" in p.message) for p in scan.warnings] == [("zz_orphan.txt", True)]
    assert "zz_orphan.txt" in scan.ignored


def test_duplicate_images_by_content_are_warned(good_folder: Path):
    (good_folder / "z_copy.png").write_bytes((good_folder / "b.png").read_bytes())
    scan = scan_dataset(good_folder, TRIGGER, resolutions=SMALL)
    assert len(scan.items) == 4
    assert [(p.file, "duplicate of b.png" in p.message) for p in scan.warnings] == [("z_copy.png", True)]


def test_tiny_images_are_warned(tmp_path: Path):
    save_image(tmp_path / "tiny.png", (100, 60))
    save_image(tmp_path / "fine.png", (400, 400))
    scan = scan_dataset(tmp_path, TRIGGER, resolutions=(64,))
    assert [(p.file, "tiny image (100x60)" in p.message) for p in scan.warnings] == [("tiny.png", True)]


def test_images_smaller_than_their_bucket_are_named_as_upscaled(tmp_path: Path):
    save_image(tmp_path / "small.png", (600, 400))
    save_image(tmp_path / "big.png", (1500, 1000))
    scan = scan_dataset(tmp_path, TRIGGER, resolutions=(1024, 768))
    (warning,) = scan.warnings
    assert warning.file == "small.png"
    assert "1248x832 at 1024 (x2.08)" in warning.message and "944x624 at 768" in warning.message
    assert "upscaled" in warning.message


def test_scan_records_size_hash_caption_and_a_bucket_per_resolution(good_folder: Path):
    scan = scan_dataset(good_folder, TRIGGER, resolutions=(1024, 768))
    a = scan.items[0]
    assert a.name == "a.jpg" and (a.width, a.height) == (200, 300)
    assert a.sha256 == hashlib.sha256((good_folder / "a.jpg").read_bytes()).hexdigest()
    assert a.bucket(1024) == Bucket(832, 1248) and a.bucket(768) == Bucket(624, 944)
    assert scan.resolutions == (1024, 768)
    assert [(s.item_index, s.resolution) for s in scan.samples()][:2] == [(0, 1024), (0, 768)]
    assert len(scan.samples()) == 6


def test_check_report_as_dict_lists_counts_buckets_and_problems(good_folder: Path):
    write_caption(good_folder / "orphan.txt", "x")
    report = inspect_dataset(good_folder, TRIGGER, resolutions=(1024, 128)).as_dict()
    assert report["ok"] and report["images"] == 3 and report["captions_from_files"] == 1
    assert report["buckets"]["1024"] == {"832x1248": 1, "1024x1024": 1, "1248x832": 1}
    assert report["buckets"]["128"] == {"112x160": 1, "128x128": 1, "160x112": 1}
    assert [w["file"] for w in report["warnings"] if "orphan" in w["message"]] == ["orphan.txt"]
    assert report["errors"] == []


# ---------------------------------------------------------------- decoding


def test_exif_orientation_is_applied(tmp_path: Path):
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 40))  # left half red, right half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    upright = load_image_rgb(tmp_path / "rotated.jpg")
    assert upright.size == (40, 80)
    top, bottom = upright.getpixel((20, 10)), upright.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 60, top  # stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    item = scan_dataset(tmp_path, TRIGGER).items[0]
    assert (item.width, item.height) == (40, 80) and item.bucket(1024) == Bucket(720, 1456)


def test_palette_image_becomes_rgb(tmp_path: Path):
    image = Image.new("RGB", (32, 32), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    image.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = load_image_rgb(tmp_path / "p.png")
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (10, 200, 30)


def test_palette_transparency_is_composited_on_white(tmp_path: Path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.save(tmp_path / "pt.png", transparency=1)
    assert load_image_rgb(tmp_path / "pt.png").getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_and_bilevel_images_become_rgb(tmp_path: Path):
    save_image(tmp_path / "g.png", (16, 16), color=77, mode="L")
    save_image(tmp_path / "one.bmp", (16, 16), color=1, mode="1")
    assert load_image_rgb(tmp_path / "g.png").getpixel((3, 3)) == (77, 77, 77)
    assert load_image_rgb(tmp_path / "one.bmp").getpixel((3, 3)) == (255, 255, 255)


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(tmp_path: Path):
    samples = np.full((16, 16), 128 * 257, dtype=np.uint16)
    samples[:, 8:] = 65535
    Image.fromarray(samples).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = load_image_rgb(tmp_path / "deep.png")
    assert out.getpixel((2, 2)) == (128, 128, 128)
    assert out.getpixel((12, 2)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path):
    save_image(tmp_path / "cmyk.jpg", (32, 32), color=(0, 255, 255, 0), mode="CMYK", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    r, g, b = load_image_rgb(tmp_path / "cmyk.jpg").getpixel((16, 16))
    assert r > 220 and g < 40 and b < 40


def test_alpha_is_composited_on_white(tmp_path: Path):
    la = Image.new("LA", (3, 1))
    la.putpixel((0, 0), (0, 0))  # black, fully transparent -> white
    la.putpixel((1, 0), (0, 255))  # black, opaque -> black
    la.putpixel((2, 0), (0, 128))  # half transparent -> mid grey
    la.save(tmp_path / "la.png")
    out = load_image_rgb(tmp_path / "la.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 0)
    assert abs(out.getpixel((2, 0))[0] - 127) <= 1
    save_image(tmp_path / "rgba.webp", (8, 8), color=(0, 0, 255, 0), mode="RGBA", lossless=True)
    assert load_image_rgb(tmp_path / "rgba.webp").getpixel((4, 4)) == (255, 255, 255)


def test_decompression_bomb_header_is_refused_naming_the_file(tmp_path: Path):
    (tmp_path / "bomb.png").write_bytes(png_header_claiming(100_000, 100_000))
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DatasetError, match=r"bomb\.png: .*decompression-bomb guard"):
        load_image_rgb(tmp_path / "bomb.png")
    assert Image.MAX_IMAGE_PIXELS == limit_before  # Pillow's global (shared with ComfyUI) is left alone
    save_image(tmp_path / "ok.png")
    with pytest.raises(DatasetError, match=r"bomb\.png"):
        scan_dataset(tmp_path, TRIGGER)


def test_decompression_bomb_guard_limit_is_checked_before_decoding(tmp_path: Path):
    data = png_header_claiming(12_000, 10_000)  # 120 M pixels claimed, no pixel data to decode
    with pytest.raises(DatasetError, match=r"big\.png: 12000x10000 .* over the decompression-bomb guard"):
        decode_image_rgb(data, "big.png", max_pixels=100_000_000)
    save_image(tmp_path / "x.png", (40, 40))
    with pytest.raises(DatasetError, match="x.png: 40x40"):
        scan_dataset(tmp_path, TRIGGER, max_image_pixels=1000)


def test_pixels_are_a_float_tensor_in_minus_one_to_one():
    image = Image.new("RGB", (4, 2), (255, 255, 255))
    image.putpixel((0, 0), (0, 0, 0))
    pixels = pixels_from_image(image)
    assert tuple(pixels.shape) == (3, 2, 4) and str(pixels.dtype) == "torch.float32"
    assert pixels[:, 0, 0].tolist() == [-1.0, -1.0, -1.0] and pixels[:, 1, 3].tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- resolutions and buckets


@pytest.mark.parametrize("resolution", [64, 128, 256, 512, 768, 1024])
def test_bucket_sides_are_multiples_of_16_with_area_near_resolution_squared(resolution: int):
    buckets = buckets_for(resolution)
    assert Bucket(resolution, resolution) in buckets
    tolerance = 24 / resolution  # each side is rounded to 16 px: relative area error shrinks as 1/resolution
    for bucket in buckets:
        assert bucket.width % 16 == 0 and bucket.height % 16 == 0, bucket
        assert abs(bucket.width * bucket.height / resolution**2 - 1) <= tolerance, bucket
        assert 1 / 2.2 <= bucket.width / bucket.height <= 2.2, bucket
    if resolution >= 512:
        assert len(buckets) == 11


def test_each_image_goes_to_the_bucket_of_the_closest_aspect():
    assert bucket_for(1200, 800, 1024) == Bucket(1248, 832)
    assert bucket_for(800, 1200, 1024) == Bucket(832, 1248)
    assert bucket_for(500, 500, 1024) == Bucket(1024, 1024)
    assert bucket_for(1920, 1080, 1024) == Bucket(1360, 768)
    assert bucket_for(5000, 1000, 1024) == Bucket(1456, 720)  # beyond 2:1 takes the widest bucket
    assert bucket_for(1920, 1080, 768) == Bucket(1024, 576)


def test_fit_to_bucket_covers_then_crops_the_centre():
    image = Image.new("RGB", (300, 100), (0, 200, 0))
    image.paste((255, 0, 0), (0, 0, 50, 100))  # the outer 50 px on each side fall outside a 2:1 crop
    image.paste((0, 0, 255), (250, 0, 300, 100))
    fitted = fit_to_bucket(image, Bucket(96, 48))
    assert fitted.size == (96, 48)
    for x in (0, 95):
        r, g, b = fitted.getpixel((x, 24))
        assert g > 150 and r < 80 and b < 80, (x, (r, g, b))
    small = fit_to_bucket(Image.new("RGB", (30, 40), (9, 9, 9)), Bucket(48, 64))  # same aspect: pure upscale
    assert small.size == (48, 64) and small.getpixel((0, 0)) == (9, 9, 9)


def test_resolutions_must_be_multiples_of_16_and_at_least_64():
    assert parse_resolutions("1024, 768") == (1024, 768)
    assert parse_resolutions(1024) == (1024,)
    assert parse_resolutions(["768", 768, 64]) == (768, 64)
    for bad in (1000, 48, 0, -16, "big", 1024.5, True):
        with pytest.raises(DatasetError, match="resolution"):
            parse_resolutions([bad])
    with pytest.raises(DatasetError, match="at least one resolution"):
        parse_resolutions("")


# ---------------------------------------------------------------- caption dropout


@pytest.mark.parametrize("probability", [PRESET.caption_dropout, 0.3])
def test_caption_dropout_rate_holds_statistically(probability: float):
    draws = 20_000
    dropout = CaptionDropout(probability, seed=123)
    dropped = sum(dropout.is_dropped(epoch, index) for epoch in range(20) for index in range(draws // 20))
    sigma = math.sqrt(draws * probability * (1 - probability))
    assert abs(dropped - draws * probability) < 5 * sigma, dropped


def test_dropped_caption_is_the_trigger_word_by_default_or_empty_on_request():
    assert PRESET.caption_dropout == 0.05
    always = dict(epoch=0, index=0, probability=1.0)
    assert apply_caption_dropout("photo of kleinchar, smiling", TRIGGER, **always) == TRIGGER
    assert apply_caption_dropout("photo of kleinchar, smiling", TRIGGER, mode="empty", **always) == ""
    never = dict(epoch=0, index=0, probability=0.0)
    assert apply_caption_dropout("photo of kleinchar", TRIGGER, **never) == "photo of kleinchar"


def test_caption_dropout_is_deterministic_per_seed_epoch_and_sample():
    def dropped(seed: int, epoch: int) -> list[int]:
        dropout = CaptionDropout(0.1, seed=seed)
        return [i for i in range(2000) if dropout.is_dropped(epoch, i)]

    assert dropped(7, 3) == dropped(7, 3)
    assert dropped(7, 3) != dropped(8, 3)
    assert dropped(7, 3) != dropped(7, 4)


def test_invalid_caption_dropout_settings_are_errors():
    with pytest.raises(DatasetError, match="caption_dropout.*1.5"):
        CaptionDropout(1.5)
    with pytest.raises(DatasetError, match="dropout_caption.*'blank'"):
        CaptionDropout(0.05, mode="blank")  # type: ignore[arg-type]


# ---------------------------------------------------------------- batching


def mixed_bucket_keys() -> list[tuple[int, int]]:
    return [(64, 64)] * 7 + [(80, 48)] * 5 + [(48, 80)] * 3 + [(64, 64)] * 2


def test_every_batch_comes_from_a_single_bucket_and_an_epoch_covers_every_sample_once():
    keys = mixed_bucket_keys()
    sampler = BucketBatchSampler(keys, batch_size=2, seed=1)
    batches = sampler.batches(0)
    for batch in batches:
        assert len({keys[i] for i in batch}) == 1, batch
    assert sorted(i for batch in batches for i in batch) == list(range(len(keys)))
    assert len(batches) == len(sampler) == 5 + 3 + 2  # ceil(9/2) + ceil(5/2) + ceil(3/2)


def test_batches_are_deterministic_per_seed_and_epoch_and_reshuffled_each_epoch():
    keys = mixed_bucket_keys()
    a, b = BucketBatchSampler(keys, 2, seed=1), BucketBatchSampler(keys, 2, seed=1)
    assert a.batches(3) == b.batches(3)
    assert a.batches(3) != a.batches(4)
    assert a.batches(3) != BucketBatchSampler(keys, 2, seed=2).batches(3)


def test_drop_last_drops_short_batches():
    keys = mixed_bucket_keys()
    batches = BucketBatchSampler(keys, 2, seed=0, drop_last=True).batches(0)
    assert all(len(b) == 2 for b in batches) and len(batches) == 4 + 2 + 1


def test_resuming_at_a_batch_position_continues_the_same_sequence():
    sampler = BucketBatchSampler(mixed_bucket_keys(), 3, seed=9)
    stream = sampler.iter_from(0)
    first_thirty = [next(stream) for _ in range(30)]
    resumed = sampler.iter_from(17)
    assert [next(resumed) for _ in range(13)] == first_thirty[17:]
    assert sampler.batch_at(17) == first_thirty[17]
    assert first_thirty[len(sampler)][0] == 1  # the second epoch starts after one epoch's batches


def test_batch_sampler_rejects_bad_sizes():
    with pytest.raises(DatasetError, match="batch_size"):
        BucketBatchSampler([(64, 64)], 0)
    with pytest.raises(DatasetError, match="lower the batch size"):
        BucketBatchSampler([(64, 64)] * 3, 4, drop_last=True)


# ---------------------------------------------------------------- spec and fingerprint


def test_dataset_spec_validates_early_and_scans(good_folder: Path):
    spec = DatasetSpec(str(good_folder), f" {TRIGGER} ", resolutions="1024,768")
    assert spec.trigger == TRIGGER and spec.resolutions == (1024, 768)
    assert spec.caption_dropout == PRESET.caption_dropout and spec.dropout_caption == "trigger"
    assert len(spec.scan()) == 3
    assert spec.dropout(seed=4) == CaptionDropout(PRESET.caption_dropout, "trigger", 4)
    with pytest.raises(DatasetError, match="caption_dropout"):
        DatasetSpec(str(good_folder), TRIGGER, caption_dropout=-0.1)
    with pytest.raises(DatasetError, match="resolution"):
        DatasetSpec(str(good_folder), TRIGGER, resolutions=(1000,))


def test_fingerprint_is_stable_and_ignores_where_the_folder_lives(good_folder: Path, tmp_path: Path):
    spec = DatasetSpec(str(good_folder), TRIGGER)
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in good_folder.iterdir():
        (moved / path.name).write_bytes(path.read_bytes())
    moved_spec = spec.with_changes(folder=str(moved))
    assert dataset_fingerprint(spec.scan(), spec) == dataset_fingerprint(spec.scan(), spec)
    assert dataset_fingerprint(spec.scan(), spec) == dataset_fingerprint(moved_spec.scan(), moved_spec)


@pytest.mark.parametrize(
    "change, part",
    [
        (lambda f, s: (write_caption(f / "a.txt", "photo of [trigger], frowning"), s), "captions"),
        (lambda f, s: (save_image(f / "b.png", (300, 200), color=(1, 2, 3)), s), "images"),
        (lambda f, s: (None, s.with_changes(caption_dropout=0.1)), "caption_dropout"),
        (lambda f, s: (None, s.with_changes(dropout_caption="empty")), "caption_dropout"),
        (lambda f, s: (None, s.with_changes(resolutions=(1024, 768))), "buckets"),
    ],
)
def test_fingerprint_changes_exactly_when_an_input_changes_and_names_it(good_folder: Path, change, part):
    spec = DatasetSpec(str(good_folder), TRIGGER)
    before, before_parts = dataset_fingerprint(spec.scan(), spec), fingerprint_parts(spec.scan(), spec)
    _, new_spec = change(good_folder, spec)
    assert changed_fingerprint_parts(before_parts, fingerprint_parts(new_spec.scan(), new_spec)) == [part]
    assert dataset_fingerprint(new_spec.scan(), new_spec) != before


# ---------------------------------------------------------------- the folder is never written


def test_scanning_and_every_dataset_operation_leave_the_folder_untouched(good_folder: Path, capsys):
    from klein_core.cli import main

    (good_folder / "fake.png").write_bytes(b"nope")
    write_caption(good_folder / "orphan.txt", "x")
    (good_folder / "notes.md").write_text("x")
    before = folder_state(good_folder)
    spec = DatasetSpec(str(good_folder), TRIGGER, resolutions=(128, 64), skip_corrupt=True)
    scan = spec.scan()
    inspect_dataset(good_folder, TRIGGER)
    dataset_fingerprint(scan, spec)
    for sample in scan.samples():
        pixels = bucket_pixels(scan.items[sample.item_index], sample.bucket)
        assert tuple(pixels.shape) == (3, sample.bucket.height, sample.bucket.width)
    main(["dataset", "check", str(good_folder), "--trigger", TRIGGER, "--json"])
    capsys.readouterr()
    assert folder_state(good_folder) == before


def test_training_pixels_refuse_a_file_changed_since_the_scan(good_folder: Path):
    scan = scan_dataset(good_folder, TRIGGER, resolutions=(64,))
    save_image(good_folder / "a.jpg", (200, 300), color=(0, 0, 0))
    with pytest.raises(DatasetError, match=r"a\.jpg: changed since the dataset was scanned"):
        bucket_pixels(scan.items[0], scan.items[0].bucket(64))


# ---------------------------------------------------------------- what the ComfyUI node lists and watches


def test_input_subfolders_that_hold_images_are_offered_two_levels_deep(tmp_path: Path):
    save_image(tmp_path / "alice" / "1.png")
    save_image(tmp_path / "people" / "bob" / "1.jpg")
    save_image(tmp_path / "people" / "carol" / "deeper" / "1.png")  # three levels: not listed
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    save_image(tmp_path / ".hidden" / "1.png")
    save_image(tmp_path / "top.png")
    assert dataset_folders(tmp_path) == ["alice", "people/bob"]
    assert dataset_folders(tmp_path / "missing") == []


def test_folder_signature_changes_when_a_file_is_added_edited_or_renamed(good_folder: Path):
    import os

    first = folder_signature(good_folder)
    assert folder_signature(good_folder) == first
    caption = good_folder / "a.txt"
    caption.write_text("photo of [trigger], edited", encoding="utf-8")
    stat = caption.stat()
    os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited = folder_signature(good_folder)
    (good_folder / "c.webp").rename(good_folder / "d.webp")
    renamed = folder_signature(good_folder)
    save_image(good_folder / "e.png")
    assert len({first, edited, renamed, folder_signature(good_folder)}) == 4
