"""The synthetic character dataset used by the demo and the tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from klein_core.data.scan import scan_dataset
from klein_core.errors import DatasetError
from klein_core.tools.sample_data import BODY_BLUE, HAT_RED, SCARF_YELLOW, make_sample_dataset


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def colour_share(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 40) -> float:
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return float((np.abs(pixels - np.array(colour)).max(axis=-1) <= tolerance).mean())


def test_sample_dataset_is_the_same_bytes_for_the_same_seed_and_differs_for_another(tmp_path: Path):
    make_sample_dataset(tmp_path / "a", count=6, seed=3)
    make_sample_dataset(tmp_path / "b", count=6, seed=3)
    make_sample_dataset(tmp_path / "c", count=6, seed=4)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    assert file_hashes(tmp_path / "a") != file_hashes(tmp_path / "c")


def test_sample_dataset_has_captioned_png_and_jpeg_images_with_the_trigger_placeholder(tmp_path: Path):
    paths = make_sample_dataset(tmp_path, count=10)
    assert len(paths) == 10
    assert {p.suffix for p in paths} == {".png", ".jpg"}
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]
    assert all("[trigger]" in c for c in captions)
    assert len(set(captions)) >= 8  # varied poses and scenes, not one caption repeated
    assert captions[0] == "photo of [trigger], standing in a park"


def test_sample_dataset_scans_cleanly_and_spreads_over_several_buckets(tmp_path: Path):
    make_sample_dataset(tmp_path, count=10)
    scan = scan_dataset(tmp_path, "kleinchar", resolutions=(128, 64))
    assert len(scan.items) == 10 and not scan.problems
    assert all(i.caption.startswith(("photo of kleinchar", "close-up photo of kleinchar")) for i in scan.items)
    assert len(scan.bucket_counts(128)) >= 4
    assert len({(i.width, i.height) for i in scan.items}) >= 4
    assert min(min(i.width, i.height) for i in scan.items) >= 256


def test_every_sample_shows_the_same_character_colours(tmp_path: Path):
    for path in make_sample_dataset(tmp_path, count=10):
        image = Image.open(path)
        for colour in (HAT_RED, BODY_BLUE, SCARF_YELLOW):
            assert colour_share(image, colour) > 0.003, (path.name, colour)


def test_the_character_varies_in_place_and_scale_between_images(tmp_path: Path):
    boxes = []
    for path in make_sample_dataset(tmp_path, count=10):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        blue = np.abs(pixels - np.array(BODY_BLUE)).max(axis=-1) <= 40
        ys, xs = np.nonzero(blue)
        boxes.append((xs.mean() / blue.shape[1], blue.mean()))
    centres, areas = [round(b[0], 2) for b in boxes], [b[1] for b in boxes]
    assert len(set(centres)) >= 6
    assert max(areas) > 3 * min(areas)  # close-ups and full-body shots


def test_sample_dataset_refuses_a_folder_with_other_files(tmp_path: Path):
    (tmp_path / "my_photo.jpg").write_bytes(b"precious")
    with pytest.raises(DatasetError, match="my_photo.jpg"):
        make_sample_dataset(tmp_path, count=3)
    assert (tmp_path / "my_photo.jpg").read_bytes() == b"precious"


def test_rewriting_the_sample_dataset_in_place_is_allowed_and_identical(tmp_path: Path):
    make_sample_dataset(tmp_path, count=4)
    first = file_hashes(tmp_path)
    make_sample_dataset(tmp_path, count=4)
    assert file_hashes(tmp_path) == first
    with pytest.raises(DatasetError, match="count"):
        make_sample_dataset(tmp_path / "new", count=0)
