"""KleinCaptionDataset inside a REAL ComfyUI server: folder list, queued scan, caching and re-run on folder edits."""

from __future__ import annotations

import pytest
from PIL import Image

from klein_core.tools.sample_data import make_sample_dataset

pytestmark = pytest.mark.comfy_server

NODE = "KleinCaptionDataset"
FOLDER = "klein_dataset_node_test"  # a subfolder of the server's input directory, unique to this file


def dataset_prompt(trigger: str = "kleinchar", folder: str = FOLDER) -> dict:
    """API format: the dataset node, and core's PreviewAny showing its image_count output as text."""
    return {
        "1": {
            "class_type": NODE,
            "inputs": {
                "folder": folder, "path": "", "trigger": trigger, "default_caption": "photo of [trigger]",
                "caption_dropout": 0.05, "dropout_caption": "trigger", "resolutions": "128",
                "trigger_policy": "prepend", "skip_corrupt": False,
            },
        },
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def dataset_folder(comfy_server):
    folder = comfy_server.input_dir / FOLDER
    make_sample_dataset(folder, count=4, size=256)
    return folder


def test_schema_lists_input_subfolders_and_the_dataset_outputs(comfy_server, dataset_folder):
    info = comfy_server.object_info(NODE)
    assert info["output"] == ["KLEIN_DATASET", "INT", "STRING"]
    assert info["output_name"] == ["dataset", "image_count", "summary"]
    folder_type, folder_config = info["input"]["required"]["folder"]
    assert folder_type == "COMBO" and FOLDER in folder_config["options"]  # listed live, no restart needed
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), name


def test_queued_scan_reports_the_image_count_and_summary_then_reruns_only_when_the_folder_changes(
    comfy_server, dataset_folder
):
    entry = comfy_server.run(dataset_prompt())
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["2"]["text"] == ["4"]
    assert "4 images, trigger 'kleinchar'" in entry["outputs"]["1"]["text"][0]
    assert "identity check (" in entry["outputs"]["1"]["text"][0]
    (sheet,) = entry["outputs"]["1"]["images"]  # the identity contact sheet is the node's preview image
    assert sheet["type"] == "temp" and sheet["filename"].endswith(".png")
    assert not (dataset_folder / sheet["filename"]).exists()

    with comfy_server.events() as events:
        prompt_id = comfy_server.queue(dataset_prompt(), client_id=events.client_id)
        unchanged = events.wait_until_prompt_done(prompt_id, timeout_s=60)
    cached = [n for e in unchanged if e["type"] == "execution_cached" for n in e["data"]["nodes"]]
    assert "1" in cached, unchanged

    Image.new("RGB", (256, 256), (200, 30, 30)).save(dataset_folder / "zz_new.png")
    entry = comfy_server.run(dataset_prompt())
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["2"]["text"] == ["5"]


def test_missing_trigger_word_is_refused_at_queue_time(comfy_server, dataset_folder):
    status, body = comfy_server.post_prompt(dataset_prompt(trigger=" "))
    assert status == 400, body
    errors = body["node_errors"]["1"]["errors"]
    assert any("trigger word is missing" in error["details"] for error in errors), errors
