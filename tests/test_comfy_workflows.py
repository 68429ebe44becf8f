"""The example workflows, queued on a REAL ComfyUI server: train then preview, preview a LoRA, plan only; cancel, cache
and memory behaviour of the trainer. Uses the session server of tests/harness/comfyui.py with the tiny Klein.

Each test POSTs the API-format copy of an example (tests/workflows/<name>.api.json, built from the UI workflow by the
real frontend: tests/workflows/build_examples.py) with only what a tiny CPU run needs changed: the tiny model files, the
sample dataset, 64 px, a few training steps. Train-then-preview keeps the shipped 50 sample steps and CFG 4 (one 50-step
image of the tiny model at 64 px takes ~3-7 s on 2 cores); the other previews use fewer sample steps.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
import torch
from harness.comfyui import REPO_ROOT
from safetensors import safe_open

pytestmark = pytest.mark.comfy_server

API_DIR = REPO_ROOT / "tests" / "workflows"
TINY_RESOLUTION = 64
TINY_TRAINING_STEPS = 4  # 4 images x 1 repeat, batch 1


def api_copy(name: str) -> dict:
    """The API-format copy of an example workflow, as ComfyUI's frontend converted it (titles dropped)."""
    prompt = json.loads((API_DIR / f"{name}.api.json").read_text())
    return {
        node_id: {"class_type": node["class_type"], "inputs": dict(node["inputs"])} for node_id, node in prompt.items()
    }


def node_of(prompt: dict, class_type: str) -> tuple[str, dict]:
    found = [(node_id, node) for node_id, node in prompt.items() if node["class_type"] == class_type]
    assert len(found) == 1, (class_type, found)
    return found[0]


def tiny_train_then_preview(assets, output_name: str, seed: int = 0, save_every: int = 0, preview: bool = True) -> dict:
    """train_then_preview.api.json on the tiny Klein. ``preview=False``: only dataset -> calculator -> trainer, and no
    preview prompts (no health previews), for the tests about the trainer alone."""
    prompt = api_copy("train_then_preview")
    _, dataset = node_of(prompt, "KleinCaptionDataset")
    dataset["inputs"].update(folder=assets.dataset_folder, resolutions=str(TINY_RESOLUTION))
    _, calculator = node_of(prompt, "KleinRepeatsCalculator")
    calculator["inputs"].update(target_repeats=1.0, resolution=256)
    _, trainer = node_of(prompt, "KleinLoRATrainer")
    trainer["inputs"].update(
        **assets.model_inputs, learning_rate=1e-3, rank=4, save_every=save_every, seed=seed, output_name=output_name
    )
    if not preview:
        trainer["inputs"]["preview_prompts"] = ""
        keep = {"KleinCaptionDataset", "KleinRepeatsCalculator", "KleinLoRATrainer"}
        prompt = {node_id: node for node_id, node in prompt.items() if node["class_type"] in keep}
    return prompt


def run_dir(assets, output_name: str) -> Path:
    return assets.server.output_dir / "klein_lora" / output_name


def lora_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:  # raises on a truncated or partial file
        return list(handle.keys())


def training_events(events: list[dict], node_id: str, kind: str) -> list[dict]:
    return [
        e["data"]
        for e in events
        if e["type"] == "klein.training" and e["data"].get("node") == node_id and e["data"].get("kind") == kind
    ]


def run_with_events(server, prompt: dict, timeout_s: float = 300) -> tuple[dict, list[dict]]:
    with server.events() as events:
        prompt_id = server.queue(prompt, client_id=events.client_id)
        events.wait_until_prompt_done(prompt_id, timeout_s=timeout_s)
        received = list(events.received)
    return server.wait_history(prompt_id, timeout_s=30), received


def is_served_png(server, image: dict) -> bool:
    """The image a node shows, fetched the way the frontend does (GET /view)."""
    query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
    status, body = server.request("GET", f"/view?{query}")
    return status == 200 and isinstance(body, bytes) and body.startswith(b"\x89PNG")


def wait_for_log(server, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = server.log_text()
        if text in log:
            return log
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the server log within {timeout_s} s:\n{server.log_tail()}")


# ---- the three examples ------------------------------------------------------------------------------------------
def test_plan_only_workflow_shows_both_dose_routes(comfy_server):
    entry = comfy_server.run(api_copy("plan_only"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    texts = [entry["outputs"][node_id]["text"][0] for node_id in api_copy("plan_only")]
    assert any("training steps: 5500" in text for text in texts), texts  # 55 images x 100 repeats, G = 1
    assert any("training steps: 1375" in text for text in texts), texts  # the same dose at grad accum 4


def test_train_then_preview_workflow_trains_publishes_the_lora_and_renders_the_grid(comfy_assets):
    server = comfy_assets.server
    prompt = tiny_train_then_preview(comfy_assets, "wf_train_preview")
    trainer_id, _ = node_of(prompt, "KleinLoRATrainer")
    preview_id, preview = node_of(prompt, "KleinBasePreviewSampler")
    save_id, _ = node_of(prompt, "SaveImage")
    report_id, _ = node_of(prompt, "KleinTrainingReport")
    assert (preview["inputs"]["sample_steps"], preview["inputs"]["cfg"]) == (50, 4.0)  # the shipped Base settings

    entry, events = run_with_events(server, prompt)

    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + server.log_tail()
    folder = run_dir(comfy_assets, "wf_train_preview")
    lora = folder / "wf_train_preview.safetensors"
    assert lora_keys(lora) and all(key.startswith("transformer.") for key in lora_keys(lora))
    published = server.models_dir / "loras" / "klein" / "wf_train_preview.safetensors"
    assert published.read_bytes() == lora.read_bytes()
    assert "klein/wf_train_preview.safetensors" in entry["outputs"][trainer_id]["text"][0]
    # ComfyUI's LoRA list (the one LoraLoader uses) now offers it without a restart.
    lora_options = server.object_info("KleinBasePreviewSampler")["input"]["required"]["lora"][1]["options"]
    assert "klein/wf_train_preview.safetensors" in lora_options

    grid_files = list(folder.glob("previews/*/grid.png"))
    assert len(grid_files) == 1
    for node_id in (preview_id, save_id, report_id):  # the grid on the preview node and in SaveImage, the report
        assert is_served_png(server, entry["outputs"][node_id]["images"][0]), node_id

    steps = training_events(events, trainer_id, "step")  # at each loss read, with every training step's loss since
    assert [step for s in steps for step, _ in s["losses"]] == list(range(1, TINY_TRAINING_STEPS + 1))
    assert all(s["training_steps"] == TINY_TRAINING_STEPS and s["s_per_step"] > 0 for s in steps)
    trainer_progress = [
        e["data"]["value"] for e in events if e["type"] == "progress" and e["data"]["node"] == trainer_id
    ]
    # the progress bar moves from the first training step on, not only at loss reads (newer ComfyUI throttles it)
    assert trainer_progress[0] == 1 and trainer_progress[-1] == TINY_TRAINING_STEPS
    assert trainer_progress == sorted(trainer_progress)
    assert training_events(events, trainer_id, "checkpoint")[-1]["validation_loss"] is not None
    assert training_events(events, trainer_id, "done")[0]["verdict"]
    progress_nodes = {e["data"]["node"] for e in events if e["type"] == "progress"}
    assert {trainer_id, preview_id} <= progress_nodes


def test_preview_existing_lora_workflow_renders_a_lora_file_from_the_loras_folder(comfy_assets):
    from diffusers import Flux2Transformer2DModel

    from klein_core.model.lora import save_lora, target_module_names
    from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG

    server = comfy_assets.server
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER_CONFIG)
    modules = dict(transformer.named_modules())
    generator = torch.Generator().manual_seed(3)
    weights = {
        name: (
            torch.randn(4, modules[name].in_features, generator=generator) * 0.1,
            torch.randn(modules[name].out_features, 4, generator=generator) * 0.1,
        )
        for name in target_module_names(transformer)
    }
    save_lora(server.models_dir / "loras" / "klein" / "wf_existing.safetensors", weights, {"trigger_word": "kleinchar"})

    prompt = api_copy("preview_existing_lora")
    preview_id, preview = node_of(prompt, "KleinBasePreviewSampler")
    # 4 sample steps and no sweep: this test is about reading a LoRA file (Base's 50 steps are covered above).
    preview["inputs"].update(
        **comfy_assets.model_inputs,
        lora="klein/wf_existing.safetensors",
        strengths="",
        width=TINY_RESOLUTION,
        height=TINY_RESOLUTION,
        sample_steps=4,
    )
    entry = server.run(prompt, timeout_s=300)

    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + server.log_tail()
    assert entry["outputs"][preview_id]["images"]
    grids = list((server.output_dir / "klein_previews").glob("*/grid.png"))
    assert grids
    listing = json.loads((grids[-1].parent / "preview.json").read_text())
    assert "kleinchar" in json.dumps(listing)  # [trigger] became the word the LoRA file records


def test_a_regularization_dataset_linked_to_the_trainer_mixes_in_apart_from_the_dose(comfy_assets):
    from klein_core.tools.sample_data import make_sample_dataset

    server = comfy_assets.server
    class_images = server.input_dir / "klein_class_images"
    if not class_images.exists():
        make_sample_dataset(class_images, count=2, seed=5, size=96)
    for caption in class_images.glob("*.txt"):
        caption.unlink()  # class images take the regularization dataset's default caption

    def prompt_with(default_caption: str) -> tuple[dict, str]:
        prompt = tiny_train_then_preview(comfy_assets, "wf_regularized", preview=False)
        _, dataset = node_of(prompt, "KleinCaptionDataset")
        trainer_id, trainer = node_of(prompt, "KleinLoRATrainer")
        prompt["class"] = {
            "class_type": "KleinCaptionDataset",
            "inputs": dict(dataset["inputs"], path=str(class_images), default_caption=default_caption),
        }
        trainer["inputs"].update(regularization=["class", 0], regularization_weight=0.1)
        return prompt, trainer_id

    prompt, trainer_id = prompt_with("photo of a person")
    entry = server.run(prompt, timeout_s=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + server.log_tail()
    summary = entry["outputs"][trainer_id]["text"][0]
    assert "4 training steps, 1.0 repeats per image" in summary  # the dose counts the 4 identity images only
    assert (
        "regularization: 2 class images at weight 0.1 (2.0 repeats each; not counted in the identity dose)" in summary
    )
    manifest = json.loads((run_dir(comfy_assets, "wf_regularized") / "run.json").read_text())
    assert manifest["regularization"]["images"] == 2

    prompt, _ = prompt_with("photo of [trigger]")  # class images must never carry the trigger word
    entry = server.run(prompt, timeout_s=300)
    assert entry["status"]["status_str"] == "error"
    assert "2 regularization captions contain the trigger" in json.dumps(entry["status"]["messages"])


def test_the_trainer_s_empty_prompt_preservation_reaches_the_run_and_a_negative_weight_is_refused(comfy_assets):
    server = comfy_assets.server
    prompt = tiny_train_then_preview(comfy_assets, "wf_preserved", preview=False)
    trainer_id, trainer = node_of(prompt, "KleinLoRATrainer")
    trainer["inputs"]["empty_prompt_preservation"] = 1.0
    entry = server.run(prompt, timeout_s=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + server.log_tail()
    manifest = json.loads((run_dir(comfy_assets, "wf_preserved") / "run.json").read_text())
    assert manifest["config"]["empty_prompt_preservation"] == 1.0

    trainer["inputs"]["empty_prompt_preservation"] = -1.0
    _status, body = server.request("POST", "/prompt", {"prompt": prompt})
    (error,) = body["node_errors"][trainer_id]["errors"]  # ComfyUI refuses it by the widget's min, naming the input
    assert (error["type"], error["details"]) == ("value_smaller_than_min", "empty_prompt_preservation")


# ---- cancel, cache, memory -----------------------------------------------------------------------------------------
def test_interrupt_during_training_stops_it_and_keeps_the_last_checkpoint_intact(comfy_assets):
    server = comfy_assets.server
    prompt = tiny_train_then_preview(comfy_assets, "wf_interrupted", save_every=2, preview=False)
    _, calculator = node_of(prompt, "KleinRepeatsCalculator")
    calculator["inputs"]["target_repeats"] = 100.0  # 400 training steps: far more than the test waits for
    trainer_id, _ = node_of(prompt, "KleinLoRATrainer")

    with server.events() as events:
        prompt_id = server.queue(prompt, client_id=events.client_id)
        events.wait_for(
            lambda e: (
                e["type"] == "klein.training"
                and e["data"].get("kind") == "checkpoint"
                and e["data"].get("training_step", 0) >= 2
            ),
            timeout_s=120,
        )
        server.interrupt()
        events.wait_until_prompt_done(prompt_id, timeout_s=60)
        received = list(events.received)
    entry = server.wait_history(prompt_id, timeout_s=30)

    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [message[0] for message in entry["status"]["messages"]]
    last_step = training_events(received, trainer_id, "step")[-1]["training_step"]
    assert last_step < 400
    folder = run_dir(comfy_assets, "wf_interrupted")
    checkpoints = sorted(folder.glob("wf_interrupted_step*.safetensors"))
    assert checkpoints, list(folder.iterdir())
    assert lora_keys(checkpoints[-1])  # the last checkpoint reads back completely
    # Saved on the way out: the last completed training step (its event may have lost the race with the cancel).
    assert int(checkpoints[-1].stem.rsplit("step", 1)[1]) in (last_step, last_step + 1)
    assert not (folder / "wf_interrupted.safetensors").exists()  # no final LoRA for an unfinished run
    partial = [p for p in server.output_dir.rglob("*") if p.name.endswith(".partial")]
    assert not partial, partial
    assert "training stopped at training step" in server.log_text()


def test_requeue_with_the_same_inputs_is_cached_and_a_new_seed_retrains(comfy_assets):
    server = comfy_assets.server
    name = f"wf_cache_{uuid.uuid4().hex[:6]}"
    first, _ = run_with_events(server, tiny_train_then_preview(comfy_assets, name, preview=False))
    assert first["status"]["status_str"] == "success", first["status"]
    lora = run_dir(comfy_assets, name) / f"{name}.safetensors"
    first_bytes, first_mtime = lora.read_bytes(), lora.stat().st_mtime_ns
    trainer_id, _ = node_of(tiny_train_then_preview(comfy_assets, name, preview=False), "KleinLoRATrainer")

    again, events = run_with_events(server, tiny_train_then_preview(comfy_assets, name, preview=False))
    cached = [node for e in events if e["type"] == "execution_cached" for node in e["data"]["nodes"]]
    assert trainer_id in cached
    assert not training_events(events, trainer_id, "step")
    assert lora.stat().st_mtime_ns == first_mtime

    reseeded, events = run_with_events(server, tiny_train_then_preview(comfy_assets, name, seed=1, preview=False))
    assert reseeded["status"]["status_str"] == "success", reseeded["status"]
    assert [step for e in training_events(events, trainer_id, "step") for step, _ in e["losses"]] == list(
        range(1, TINY_TRAINING_STEPS + 1)
    )  # trained again, every training step
    assert lora.read_bytes() != first_bytes  # a new seed trained a different LoRA


def post_free_and_wait(server, flags: dict, nudge: dict) -> list[str]:
    """POST /free, then queue ``nudge`` (fully cached, so it runs nothing): ComfyUI reads the flags after a prompt (a
    flag set while its worker is busy collecting garbage would otherwise wait for its next wake-up, up to 1000 s).
    The nudge is the cached prompt itself because any other prompt would drop the run from ComfyUI's node cache.
    Returns the nodes the nudge executed."""
    status, _ = server.request("POST", "/free", flags)
    assert status == 200
    entry, events = run_with_events(server, nudge)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return [e["data"]["node"] for e in events if e["type"] == "executing" and e["data"].get("node") is not None]


def test_comfyui_free_memory_actions_release_the_cached_klein_run(comfy_assets):
    """ "Unload models" offloads the run's models (to RAM on a GPU machine); "free model and node cache" drops it."""
    server = comfy_assets.server
    name = f"wf_free_{uuid.uuid4().hex[:6]}"
    prompt = tiny_train_then_preview(comfy_assets, name, preview=False)
    entry, _ = run_with_events(server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    unload_line = "[Klein LoRA] ComfyUI is freeing memory (unload all models)"
    before = server.log_text().count(unload_line)

    executed = post_free_and_wait(server, {"unload_models": True}, prompt)
    assert not executed  # unloading models keeps ComfyUI's node cache: the run is still there for a preview
    wait_for_log(server, unload_line)
    assert server.log_text().count(unload_line) > before
    assert f"{name} released from memory" not in server.log_text()  # offloaded, still cached for the preview

    post_free_and_wait(server, {"free_memory": True}, prompt)
    wait_for_log(server, f"{name} released from memory")


# ---- continue from a checkpoint ------------------------------------------------------------------------------------
def test_the_trainer_continues_a_run_from_a_step_checkpoint_and_says_which_continuation_it_made(comfy_assets):
    server = comfy_assets.server
    parent = f"wf_parent_{uuid.uuid4().hex[:6]}"
    entry, _ = run_with_events(server, tiny_train_then_preview(comfy_assets, parent, save_every=2, preview=False))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + server.log_tail()
    options = server.object_info("KleinLoRATrainer")["input"]["optional"]["continue_from"][1]["options"]
    newest, earlier = f"{parent}/{parent}_step000004.safetensors", f"{parent}/{parent}_step000002.safetensors"
    assert {newest, earlier} <= set(options) and options[0] == "(none)"

    def continued(name: str, checkpoint: str, **changes) -> tuple[dict, str, list[dict]]:
        prompt = tiny_train_then_preview(comfy_assets, name, save_every=2, preview=False)
        trainer_id, trainer = node_of(prompt, "KleinLoRATrainer")
        # 4 images, B = G = 1: 0.5 more repeats per image = ceil(4·0.5/1) = 2 more training steps
        trainer["inputs"].update(continue_from=checkpoint, extra_repeats_per_image=0.5, **changes)
        entry, events = run_with_events(server, prompt)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + server.log_tail()
        return (
            json.loads((run_dir(comfy_assets, name) / "run.json").read_text()),
            entry["outputs"][trainer_id]["text"][0],
            training_events(events, trainer_id, "step"),
        )

    manifest, summary, steps = continued(f"{parent}_more", newest)
    assert summary.startswith(
        f"continued from {parent}_step000004.safetensors (training step 4) with 0.5 more repeats per image "
        "(2 more training steps): exact optimizer continuation from the run's newest state"
    ), summary
    assert "6 training steps, 1.5 repeats per image" in summary  # the dose is cumulative
    assert [step for s in steps for step, _ in s["losses"]] == [5, 6]  # only the extra training steps ran
    assert manifest["lineage"]["parent_run"] == str(run_dir(comfy_assets, parent).resolve())
    assert manifest["resumed_from"]["kind"] == "state"
    assert lora_keys(run_dir(comfy_assets, f"{parent}_more") / f"{parent}_more_step000006.safetensors")

    manifest, summary, _ = continued(f"{parent}_lower", earlier, learning_rate=5e-4)
    assert "fresh optimizer with a 2-step LR warmup" in summary, summary
    assert "changed: learning_rate (0.001 -> 0.0005)" in summary, summary
    assert (manifest["lineage"]["parent_step"], manifest["resumed_from"]["kind"]) == (2, "checkpoint")
    assert sorted(p.name for p in run_dir(comfy_assets, f"{parent}_lower").glob("*_step*.safetensors")) == [
        f"{parent}_lower_step000004.safetensors"
    ]
