"""The shipped example workflows: UI format for the Templates menu, an API copy for the server tests, a thumbnail, and
the starter preset as their defaults. Runs everywhere (no ComfyUI needed); the browser test additionally checks that
the real frontends turn each UI workflow into exactly its API copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from klein_core.preset import PRESET

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "example_workflows"
API_COPIES = REPO_ROOT / "tests" / "workflows"
NAMES = ("train_then_preview", "preview_existing_lora", "plan_only")
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # never sent to the server


def ui(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def api(name: str) -> dict:
    return json.loads((API_COPIES / f"{name}.api.json").read_text())


def executable_nodes(workflow: dict) -> dict[str, dict]:
    return {str(node["id"]): node for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY_NODES}


def node_by_type(workflow: dict, node_type: str) -> dict:
    (node,) = [n for n in workflow["nodes"] if n["type"] == node_type]
    return node


def widget_values(node: dict) -> dict:
    """Widget name -> value: the node's widget inputs, in order, against its widgets_values (frontend 1.16+ lists
    every widget as an input with a ``widget`` entry; the builder's frontend does)."""
    names = [i["name"] for i in node.get("inputs", []) if i.get("widget")]
    values = node.get("widgets_values") or []
    assert len(names) == len(values), (node["type"], names, values)
    return dict(zip(names, values))


def test_every_example_is_a_ui_workflow_with_an_api_copy_and_a_jpeg_thumbnail():
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == sorted(NAMES)
    for name in NAMES:
        workflow = ui(name)
        assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "version"} <= set(workflow), name
        assert api(name), name
        with Image.open(EXAMPLES / f"{name}.jpg") as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.width >= 320, name


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_and_api_copy_have_the_same_nodes_links_and_widget_values(name):
    workflow, prompt = ui(name), api(name)
    nodes = executable_nodes(workflow)
    assert {node_id: node["type"] for node_id, node in nodes.items()} == {
        node_id: entry["class_type"] for node_id, entry in prompt.items()
    }
    ui_links = set()
    for _link_id, source, source_slot, target, target_slot, _type in workflow["links"]:
        input_name = next(n for n in workflow["nodes"] if n["id"] == target)["inputs"][target_slot]["name"]
        ui_links.add((str(source), source_slot, str(target), input_name))
    api_links = {
        (value[0], value[1], node_id, input_name)
        for node_id, entry in prompt.items()
        for input_name, value in entry["inputs"].items()
        if isinstance(value, list)
    }
    assert ui_links == api_links
    for node_id, node in nodes.items():
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        expected = {k: v for k, v in widget_values(node).items() if k not in linked}
        actual = {k: v for k, v in prompt[node_id]["inputs"].items() if not isinstance(v, list)}
        assert actual == expected, node["type"]


def test_train_then_preview_is_one_canvas_from_dataset_to_saved_grid():
    workflow = ui("train_then_preview")
    prompt = api("train_then_preview")
    ids = {node["type"]: str(node["id"]) for node in workflow["nodes"]}
    links = {
        (value[0], value[1], node_id, name)
        for node_id, entry in prompt.items()
        for name, value in entry["inputs"].items()
        if isinstance(value, list)
    }
    assert {
        (ids["KleinCaptionDataset"], 1, ids["KleinRepeatsCalculator"], "images"),  # image_count -> N
        (ids["KleinCaptionDataset"], 0, ids["KleinLoRATrainer"], "dataset"),
        (ids["KleinRepeatsCalculator"], 0, ids["KleinLoRATrainer"], "training_steps"),  # S -> trainer
        (ids["KleinLoRATrainer"], 0, ids["KleinBasePreviewSampler"], "run"),
        (ids["KleinLoRATrainer"], 0, ids["KleinTrainingReport"], "run"),
        (ids["KleinBasePreviewSampler"], 0, ids["SaveImage"], "images"),  # the grid
    } == links


def test_examples_default_to_the_starter_preset():
    train = ui("train_then_preview")
    assert widget_values(node_by_type(train, "KleinCaptionDataset"))["resolutions"] == str(PRESET.resolution)
    calculator = widget_values(node_by_type(train, "KleinRepeatsCalculator"))
    assert (calculator["target_repeats"], calculator["batch_size"], calculator["grad_accum"]) == (
        PRESET.target_repeats,
        PRESET.batch_size,
        PRESET.grad_accum,
    )
    trainer = widget_values(node_by_type(train, "KleinLoRATrainer"))
    assert (trainer["learning_rate"], trainer["rank"], trainer["batch_size"], trainer["grad_accum"]) == (
        PRESET.learning_rate,
        PRESET.rank,
        PRESET.batch_size,
        PRESET.grad_accum,
    )
    assert "base" in trainer["diffusion_model"]  # Klein Base, never the distilled klein
    for name in ("train_then_preview", "preview_existing_lora"):
        preview = widget_values(node_by_type(ui(name), "KleinBasePreviewSampler"))
        assert (preview["sample_steps"], preview["cfg"]) == (PRESET.sample_steps, PRESET.cfg), name


def test_each_example_explains_itself_in_a_note_with_the_base_sampling_advice():
    for name in NAMES:
        notes = [n["widgets_values"][0] for n in ui(name)["nodes"] if n["type"] in FRONTEND_ONLY_NODES]
        assert notes, name
        if name != "plan_only":
            assert f"{PRESET.sample_steps} sample steps" in notes[0] and f"CFG {PRESET.cfg:g}" in notes[0], name
        else:
            assert "S = ceil(N·R/(B·G))" in notes[0]
