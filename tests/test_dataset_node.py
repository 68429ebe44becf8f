"""KleinCaptionDataset against ComfyUI's real node API and folder_paths.

Runs only where ``comfy_api`` is importable (skipped otherwise, never faked). tests/test_comfy_server.py runs this
file inside the real ComfyUI's own venv.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from harness.comfyui import import_pack_module, require_comfy_api


@pytest.fixture(scope="module")
def node():
    require_comfy_api()
    return import_pack_module("nodes.dataset_node")


@pytest.fixture(scope="module")
def core():
    require_comfy_api()
    return import_pack_module("klein_core.data.spec"), import_pack_module("klein_core.tools.sample_data")


@pytest.fixture
def input_dir(tmp_path: Path, node):
    """A temporary ComfyUI input directory with one sample dataset in it."""
    import folder_paths

    root = tmp_path / "input"
    import_pack_module("klein_core.tools.sample_data").make_sample_dataset(root / "kleinchar", count=4, size=256)
    (root / "unrelated").mkdir()
    before = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(root))
    yield root
    folder_paths.set_input_directory(before)


def widgets(**overrides) -> dict:
    values = dict(
        folder="kleinchar",
        trigger="kleinchar",
        default_caption="photo of [trigger]",
        caption_dropout=0.05,
        dropout_caption="trigger",
        resolutions="128",
        trigger_policy="prepend",
        skip_corrupt=False,
        path="",
    )
    values.update(overrides)
    return values


def test_every_input_has_a_tooltip_and_outputs_feed_the_trainer_and_calculator(node, input_dir):
    schema = node.KleinCaptionDataset.define_schema()
    assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    assert [o.io_type for o in schema.outputs] == ["KLEIN_DATASET", "INT", "STRING"]
    folder_input = next(i for i in schema.inputs if i.id == "folder")
    assert folder_input.options == ["kleinchar", node.USE_PATH]  # only folders that hold images


def test_execute_scans_the_chosen_input_subfolder(node, core, input_dir):
    dataset_module, _ = core
    output = node.KleinCaptionDataset.execute(**widgets())
    spec, count, summary = output.result
    assert isinstance(spec, dataset_module.DatasetSpec)
    assert Path(spec.folder) == input_dir / "kleinchar" and spec.trigger == "kleinchar"
    assert spec.resolutions == (128,) and spec.caption_dropout == 0.05
    assert count == 4 and "4 images, trigger 'kleinchar'" in summary
    assert output.ui["text"] == (summary,)
    assert "identity check (" in summary and "0 of 4 images flagged" in summary


def test_the_preview_image_is_the_identity_contact_sheet_and_the_summary_lists_the_flags(node, input_dir):
    import folder_paths
    from PIL import Image

    folder = input_dir / "kleinchar"
    with Image.open(folder / "sample_02.png") as shot:
        shot.resize((shot.width - 8, shot.height - 8)).save(folder / "sample_02_again.png")
    output = node.KleinCaptionDataset.execute(**widgets())
    _, count, summary = output.result
    assert count == 5
    assert "- sample_02_again.png: [near_duplicate] near-duplicate of sample_02.png" in summary
    (shown,) = output.ui["images"]
    sheet = Path(folder_paths.get_temp_directory(), shown["subfolder"], shown["filename"])
    with Image.open(sheet) as image:
        assert image.width > 2 * 192 and image.height > 2 * 192  # five cells of 192 px, three a row
    assert not any(p.name == shown["filename"] for p in folder.iterdir())


def test_a_path_overrides_the_list(node, input_dir, tmp_path: Path):
    other = tmp_path / "elsewhere"
    import_pack_module("klein_core.tools.sample_data").make_sample_dataset(other, count=3, size=256)
    spec, count, _ = node.KleinCaptionDataset.execute(**widgets(folder=node.USE_PATH, path=str(other))).result
    assert Path(spec.folder) == other and count == 3


def test_a_broken_file_fails_the_node_naming_it(node, core, input_dir):
    dataset_module, _ = core
    (input_dir / "kleinchar" / "broken.jpg").write_bytes(b"\xff\xd8\xff nope")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        node.KleinCaptionDataset.execute(**widgets())
    spec, count, summary = node.KleinCaptionDataset.execute(**widgets(skip_corrupt=True)).result
    assert count == 4 and "broken.jpg: skipped" in summary


def test_validation_names_a_missing_trigger_a_bad_resolution_and_an_unknown_folder(node, input_dir):
    validate = node.KleinCaptionDataset.validate_inputs
    assert validate(folder="kleinchar", trigger="kleinchar", resolutions="1024,768") is True
    assert "trigger word is missing" in validate(folder="kleinchar", trigger=" ", resolutions="1024")
    assert "1000" in validate(folder="kleinchar", trigger="k", resolutions="1000")
    assert "'gone'" in validate(folder="gone", trigger="k", resolutions="1024")
    assert validate(folder=node.USE_PATH, trigger="k", resolutions="1024", path="/anywhere") is True


def test_fingerprint_changes_when_the_folder_changes(node, input_dir):
    fingerprint = node.KleinCaptionDataset.fingerprint_inputs
    first = fingerprint(**widgets())
    assert fingerprint(**widgets()) == first
    caption = input_dir / "kleinchar" / "sample_00.txt"
    caption.write_text("photo of [trigger], edited", encoding="utf-8")
    stat = caption.stat()
    os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = fingerprint(**widgets())
    assert second != first
    (input_dir / "kleinchar" / "new.txt").write_text("x", encoding="utf-8")
    assert fingerprint(**widgets()) not in (first, second)


def test_the_node_never_writes_into_the_dataset_folder(node, input_dir):
    folder = input_dir / "kleinchar"

    def state() -> dict:
        return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}

    before = state()
    node.KleinCaptionDataset.validate_inputs(folder="kleinchar", trigger="kleinchar", resolutions="128")
    node.KleinCaptionDataset.fingerprint_inputs(**widgets())
    node.KleinCaptionDataset.execute(**widgets())
    assert state() == before
