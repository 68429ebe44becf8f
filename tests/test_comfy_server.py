"""The pack inside a REAL ComfyUI server on loopback (see tests/harness/comfyui.py and shared/comfyui-ci.md).

One server serves the whole session. Against the PyPI tree (ComfyUI 0.3.75) only pack plumbing is checked; set
COMFYUI_DIR to run the same tests against a current ComfyUI.
"""

from __future__ import annotations

import re
import sys

import pytest
from harness.comfyui import PACK_DIR_NAME, REPO_ROOT, TESTS_DIR

pytestmark = pytest.mark.comfy_server

CALCULATOR = "KleinRepeatsCalculator"
# Every node of the pack and the module that defines it: a node must be listed once its module exists.
PACK_NODES = {
    "KleinRepeatsCalculator": "nodes/calculator_node.py",
    "KleinCaptionDataset": "nodes/dataset_node.py",
    "KleinLoRATrainer": "nodes/trainer_node.py",
    "KleinBasePreviewSampler": "nodes/preview_node.py",
    "KleinTrainingReport": "nodes/report_node.py",
}
CORE_SOCKET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "IMAGE", "MASK", "LATENT", "MODEL", "CLIP",
                     "VAE", "CONDITIONING", "*"}  # fmt: skip


def calculator_prompt(images=55, target_repeats=100, batch_size=1, grad_accum=4) -> dict:
    """API format: the calculator, and core's PreviewAny showing its training_steps output as text."""
    return {
        "1": {
            "class_type": CALCULATOR,
            "inputs": {"images": images, "target_repeats": target_repeats, "batch_size": batch_size,
                       "grad_accum": grad_accum},
        },
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }  # fmt: skip


def pack_entries(object_info: dict) -> dict:
    return {
        node_id: info for node_id, info in object_info.items() if PACK_DIR_NAME in str(info.get("python_module", ""))
    }


def test_server_runs_the_expected_comfyui_tree(comfy_server):
    stats = comfy_server.get_json("/system_stats")
    assert stats["system"]["comfyui_version"] == comfy_server.env.version


def test_object_info_lists_every_node_whose_module_exists(comfy_server):
    listed = pack_entries(comfy_server.object_info())
    expected = {node_id for node_id, module in PACK_NODES.items() if (REPO_ROOT / module).exists()}
    assert CALCULATOR in expected
    assert expected <= set(listed), f"missing from /object_info: {expected - set(listed)}\n{comfy_server.log_tail()}"


def test_pack_node_ids_types_and_categories_are_prefixed(comfy_server):
    listed = pack_entries(comfy_server.object_info())
    assert listed, "the pack registered no node"
    for node_id, info in listed.items():
        assert node_id.startswith("Klein"), node_id
        assert info["category"].startswith("Klein LoRA/"), (node_id, info["category"])
        socket_types = list(info["output"])
        for section in ("required", "optional"):
            socket_types += [spec[0] for spec in info["input"].get(section, {}).values()]
        for socket_type in socket_types:
            if isinstance(socket_type, str) and socket_type not in CORE_SOCKET_TYPES:
                assert socket_type.startswith("KLEIN_"), (node_id, socket_type)


def test_calculator_schema_as_the_frontend_sees_it(comfy_server):
    info = comfy_server.object_info(CALCULATOR)
    assert info["output"] == ["INT", "STRING"]
    assert info["output_name"] == ["training_steps", "summary"]
    assert info["output_node"] is True
    required = info["input"]["required"]
    for name in ("images", "target_repeats", "batch_size", "grad_accum"):
        assert "S = ceil(N*R/(B*G))" in required[name][1]["tooltip"], name
    assert required["grad_accum"][1]["min"] == 1


def test_log_shows_the_pack_imported_and_nothing_failed(comfy_server):
    log = comfy_server.log_text()
    assert "IMPORT FAILED" not in log, log[-6000:]
    assert re.search(rf"seconds: .*{re.escape(PACK_DIR_NAME)}\s*$", log, re.MULTILINE), log[-6000:]


def test_queued_plan_reports_seed_training_steps_in_history_and_events(comfy_server):
    with comfy_server.events() as events:
        prompt_id = comfy_server.queue(calculator_prompt(grad_accum=4), client_id=events.client_id)
        prompt_events = events.wait_until_prompt_done(prompt_id, timeout_s=60)
    entry = comfy_server.wait_history(prompt_id, timeout_s=30)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["2"]["text"] == ["1375"]  # the INT output, through a link into a core node
    assert "training steps: 1375" in entry["outputs"]["1"]["text"][0]  # the summary shown on the node
    executed = {event["data"]["node"] for event in prompt_events if event["type"] == "executed"}
    assert {"1", "2"} <= executed


def test_grad_accum_zero_is_rejected_naming_the_input(comfy_server):
    status, body = comfy_server.post_prompt(calculator_prompt(grad_accum=0))
    assert status == 400, body
    errors = body["node_errors"]["1"]["errors"]
    assert any(error["extra_info"].get("input_name") == "grad_accum" for error in errors), errors
    assert all(error["type"] == "value_smaller_than_min" for error in errors), errors


def test_node_unit_tests_pass_inside_comfyui_python(comfy_env):
    """The node execute tests skip where comfy_api is absent; here they run in the real ComfyUI's venv."""
    node_test_files = sorted(str(path.relative_to(REPO_ROOT)) for path in TESTS_DIR.glob("test_*_node.py"))
    assert node_test_files
    completed = comfy_env.run_python(
        "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *node_test_files, timeout=600, unset=("COMFYUI_DIR",)
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    assert "comfy_api is not importable" not in output, output[-6000:]
    sys.stdout.write(output.splitlines()[-1] + "\n")


def test_every_input_and_output_of_every_pack_node_has_a_tooltip(comfy_server):
    listed = pack_entries(comfy_server.object_info())
    assert set(PACK_NODES) <= set(listed)
    for node_id, info in listed.items():
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip", "").strip(), (node_id, name)
        assert len(info["output_tooltips"]) == len(info["output"]), node_id
        for name, tooltip in zip(info["output_name"], info["output_tooltips"]):
            assert tooltip and tooltip.strip(), (node_id, name)


def test_every_pack_node_has_a_help_page_naming_its_inputs_and_the_base_sampling_advice(comfy_server):
    """web/docs/<NodeId>.md, served where the frontend's node help looks for it."""
    for node_id, info in pack_entries(comfy_server.object_info()).items():
        status, page = comfy_server.request("GET", f"/extensions/{PACK_DIR_NAME}/docs/{node_id}.md")
        assert status == 200, node_id
        text = page.decode() if isinstance(page, bytes) else str(page)
        assert "## Base sampling advice" in text and "50 sample steps" in text, node_id
        assert "## Formula" in text and "## Inputs" in text, node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                label = spec[1].get("display_name", name) if len(spec) > 1 else name
                assert name in text or label in text, (node_id, name)


def test_seed_inputs_are_not_randomized_after_each_queue(comfy_server):
    """The frontend adds "randomize after generate" to any input named seed unless the schema says otherwise: the
    trainer would silently train again on every queue and preview grids would stop being comparable."""
    listed = pack_entries(comfy_server.object_info())
    seeds = {
        node_id: info["input"]["required"]["seed"]
        for node_id, info in listed.items()
        if "seed" in info["input"].get("required", {})
    }
    assert {"KleinLoRATrainer", "KleinBasePreviewSampler"} <= set(seeds), seeds
    for node_id, spec in seeds.items():
        assert spec[1].get("control_after_generate") is False, (node_id, spec)
