"""The pack in the REAL ComfyUI frontend, in headless Chromium: node library, templates, a template run with the grid
shown on the preview node and the live training chart. Saves a screenshot to artifacts/ (git-ignored).

Needs Debian's chromium (.ci/run installs it); skips, saying so, where there is none. Runs against the session server
(tests/harness/comfyui.py): ComfyUI 0.3.75 with frontend 1.32 from PyPI, or the tree in $COMFYUI_DIR.
"""

from __future__ import annotations

import json

import pytest
from harness.browser import ARTIFACTS_DIR, Browser, find_chromium
from harness.comfyui import PACK_DIR_NAME, REPO_ROOT
from PIL import Image

pytestmark = pytest.mark.browser

PACK_NODES = ("KleinRepeatsCalculator", "KleinCaptionDataset", "KleinLoRATrainer", "KleinBasePreviewSampler",
              "KleinTrainingReport")  # fmt: skip
TEMPLATES = ("train_then_preview", "preview_existing_lora", "plan_only")
SMOOTH_LINE_RGB = (0x5F, 0xA8, 0xFF)  # web/js/training_chart.js COLORS.smooth


@pytest.fixture(scope="module")
def browser(comfy_server):
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "no Chromium on this machine: install Debian's chromium (apt-get install -y chromium; "
            ".ci/run does) or set KLEIN_CHROMIUM"
        )
    chromium = Browser(executable)
    try:
        chromium.start()
        chromium.open_comfyui(comfy_server)
        yield chromium
    finally:
        chromium.stop()


def wait_ms(ms: int) -> str:
    return f"await new Promise((resolve) => setTimeout(resolve, {ms}));"


def click_text_js(text: str) -> str:
    """JS: click the innermost element whose own text is exactly ``text``."""
    return (
        f"(() => {{ const hit = [...document.querySelectorAll('body *')].filter((e) => e.children.length === 0 "
        f"&& e.textContent.trim() === {json.dumps(text)}); if (!hit.length) return false; "
        f"hit[0].scrollIntoView(); hit[0].click(); return true; }})()"
    )


def api_copy(name: str) -> dict:
    prompt = json.loads((REPO_ROOT / "tests" / "workflows" / f"{name}.api.json").read_text())
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompt.items()}


def test_pack_nodes_are_registered_and_found_in_the_node_library(browser):
    registered = browser.evaluate(
        f"{json.dumps(PACK_NODES)}.map((t) => [t, LiteGraph.registered_node_types[t]?.category ?? null])"
    )
    assert all(category and category.startswith("Klein LoRA/") for _, category in registered), registered

    shown = browser.evaluate(f"""(async () => {{
        await app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
        {wait_ms(1000)}
        const input = [...document.querySelectorAll('input')].find((i) => /search/i.test(i.placeholder || ''));
        input.focus(); input.value = 'Klein'; input.dispatchEvent(new Event('input', {{bubbles: true}}));
        {wait_ms(1500)}
        const text = document.body.innerText;
        await app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
        return text;
    }})()""")
    for display_name in (
        "Klein LoRA Trainer",
        "Klein Caption Dataset",
        "Klein Repeats Calculator",
        "Klein Base Preview Sampler",
        "Klein Training Report",
    ):
        assert display_name in shown, display_name


def test_templates_are_listed_under_the_pack_name_with_thumbnails_and_one_loads(browser):
    listed = browser.evaluate("fetch('/api/workflow_templates').then((r) => r.json())")
    assert sorted(listed[PACK_DIR_NAME]) == sorted(TEMPLATES)
    thumbnails = browser.evaluate(f"""Promise.all({json.dumps(TEMPLATES)}.map((name) =>
        fetch(`/api/workflow_templates/{PACK_DIR_NAME}/${{name}}.jpg`)
            .then((r) => [r.status, r.headers.get('content-type')])))""")
    assert all(status == 200 and "jpeg" in kind for status, kind in thumbnails), thumbnails

    browser.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    browser.wait_for(click_text_js(PACK_DIR_NAME), timeout_s=20)  # EXTENSIONS -> klein-lora-trainer
    browser.wait_for(f"{json.dumps(TEMPLATES)}.every((name) => document.body.innerText.includes(name))", 20)
    assert browser.evaluate(click_text_js("train_then_preview"))
    types = browser.wait_for(
        "(() => { const t = app.graph._nodes.map((n) => n.type); return t.includes('KleinLoRATrainer') && t; })()",
        timeout_s=20,
    )
    assert {
        "KleinCaptionDataset",
        "KleinRepeatsCalculator",
        "KleinLoRATrainer",
        "KleinBasePreviewSampler",
        "KleinTrainingReport",
        "SaveImage",
        "MarkdownNote",
    } == set(types)


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_frontend_turns_each_template_into_its_api_copy(browser, name):
    """What the server tests POST is exactly what this frontend queues for the shipped workflow."""
    converted = browser.evaluate(f"""(async () => {{
        const workflow = await (await fetch('/api/workflow_templates/{PACK_DIR_NAME}/{name}.json')).json();
        await app.loadGraphData(workflow);
        const output = (await app.graphToPrompt()).output;
        return Object.fromEntries(
            Object.entries(output).map(([id, n]) => [id, {{class_type: n.class_type, inputs: n.inputs}}]));
    }})()""")
    assert converted == api_copy(name)


def test_queued_template_shows_the_grid_on_the_preview_node_and_the_live_chart_updates(browser, comfy_assets):
    tiny = {
        "KleinCaptionDataset": {"folder": comfy_assets.dataset_folder, "resolutions": "64"},
        "KleinRepeatsCalculator": {"target_repeats": 1, "resolution": 256},
        "KleinLoRATrainer": {
            **comfy_assets.model_inputs,
            "learning_rate": 1e-3,
            "rank": 4,
            "save_every": 2,
            "output_name": "browser_run",
        },
        "KleinBasePreviewSampler": {"sample_steps": 4},  # Base's 50 are run by test_comfy_workflows.py
    }
    browser.evaluate(f"""(async (values) => {{
        const workflow = await (await fetch('/api/workflow_templates/{PACK_DIR_NAME}/train_then_preview.json')).json();
        await app.loadGraphData(workflow);
        for (const [type, widgets] of Object.entries(values)) {{
            const node = app.graph._nodes.find((n) => n.type === type);
            for (const [name, value] of Object.entries(widgets))
                node.widgets.find((w) => w.name === name).value = value;
        }}
        await app.queuePrompt(0, 1);
        return true;
    }})({json.dumps(tiny)})""")
    ids = browser.evaluate("Object.fromEntries(app.graph._nodes.map((n) => [n.type, String(n.id)]))")

    # The live chart: one point per training step (sent at each loss read), then the validation loss and the verdict.
    browser.wait_for(f"(window.KleinTrainingCharts.get('{ids['KleinLoRATrainer']}')?.losses.length ?? 0) >= 1", 180)
    browser.wait_for(f"!!window.KleinTrainingCharts.get('{ids['KleinLoRATrainer']}').verdict", 240)
    state = browser.evaluate(
        f"(() => {{ const s = window.KleinTrainingCharts.get('{ids['KleinLoRATrainer']}'); "
        "return {steps: s.losses.map((p) => p[0]), validation: s.validation.length, "
        "status: s.status, verdict: s.verdict, draws: s.draws, updates: s.updates}; })()"
    )
    assert state["steps"] == [1, 2, 3, 4]
    assert state["validation"] == 2  # checkpoints at training steps 2 and 4
    assert state["status"].startswith("done: 4/4") and state["verdict"].startswith(("Healthy", "Collapse"))
    assert state["updates"] >= 4 and state["draws"] >= state["updates"]  # redrawn on every event
    line_pixels = browser.evaluate(f"""(() => {{
        const node = app.graph.getNodeById({ids["KleinLoRATrainer"]});
        const canvas = node.kleinChart.canvas,
            data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let hits = 0;
        for (let i = 0; i < data.length; i += 4)
            if (Math.abs(data[i] - {SMOOTH_LINE_RGB[0]}) < 12 && Math.abs(data[i + 1] - {SMOOTH_LINE_RGB[1]}) < 12 &&
                Math.abs(data[i + 2] - {SMOOTH_LINE_RGB[2]}) < 12) hits++;
        return hits;
    }})()""")
    assert line_pixels > 20, "the smoothed loss line is not drawn on the trainer node"

    # When the prompt is done: the finished grid on the preview node (not the last single cell of its progress
    # previews), the report on its node and the saved grid on SaveImage.
    browser.wait_for(
        "fetch('/queue').then((r) => r.json()).then((q) => !q.queue_running.length && !q.queue_pending.length)", 240
    )
    (entry,) = comfy_assets.server.get_json("/history?max_items=1").values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"][ids["SaveImage"]]["images"][0]
    with Image.open(comfy_assets.server.output_dir / saved["subfolder"] / saved["filename"]) as grid:
        grid_aspect = grid.width / grid.height
    browser.fit_graph()  # the frontend loads a node's images when it draws the node
    for node_type in ("KleinBasePreviewSampler", "KleinTrainingReport", "SaveImage"):
        aspect = grid_aspect if node_type != "KleinTrainingReport" else 0  # 0: any image
        browser.wait_for(
            f"""(() => {{ const img = app.graph.getNodeById({ids[node_type]}).imgs?.[0];
            return !!img && img.complete && img.naturalWidth > 0 &&
                   ({aspect} === 0 || Math.abs(img.naturalWidth / img.naturalHeight / {aspect} - 1) < 0.02); }})()""",
            30,
        )

    version = browser.evaluate("fetch('/system_stats').then((r) => r.json()).then((s) => s.system.comfyui_version)")
    shot = browser.screenshot(ARTIFACTS_DIR / f"comfyui-{version}-train_then_preview.png")
    print(f"\nscreenshot of the train-then-preview graph after a run: {shot}")
