"""Rebuild the example workflows IN THE REAL FRONTEND, so they are exactly what ComfyUI itself saves.

    COMFYUI_DIR=~/.cache/klein-lora/comfyui-current python tests/workflows/build_examples.py

Starts a ComfyUI server with the pack (tests/harness/comfyui.py) and headless Chromium (tests/harness/browser.py),
creates each graph below with the frontend's own LiteGraph API (nodes, widget values, links, notes, groups), then
writes:

- ``example_workflows/<name>.json``: ``app.graph.serialize()``, the UI format the Templates menu loads;
- ``tests/workflows/<name>.api.json``: ``app.graphToPrompt()``, the API format the server tests POST;
- ``example_workflows/<name>.jpg``: a screenshot of the graph as the template thumbnail.

tests/test_example_workflows.py checks that the two copies agree; the browser test loads the UI copy in both
frontends and compares what the frontend converts it to with the API copy. The defaults are the starter preset
(klein_core/preset.py): edit the specs here, never the JSON by hand.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
sys.path[:0] = [str(HERE.parent), str(REPO_ROOT)]

from harness.browser import Browser, find_chromium  # noqa: E402
from harness.comfyui import ComfyServer, prepare_comfy_env  # noqa: E402

from klein_core.preset import PRESET  # noqa: E402

EXAMPLES_DIR = REPO_ROOT / "example_workflows"
API_DIR = HERE
THUMBNAIL_WIDTH = 640

# The files a Klein 9B Base user has (BFL's file name; ComfyUI's text encoder and VAE names).
MODEL_FILES = {
    "diffusion_model": "flux-2-klein-base-9b.safetensors",
    "text_encoder": "qwen_3_8b.safetensors",
    "vae": "flux2-vae.safetensors",
}
TRIGGER = "kleinchar"

MODELS_NOTE = "\n".join(
    [
        "**Models**: Klein **Base**, never the distilled klein (LoRAs trained on distilled weights collapse).",
        "",
        f"- `models/diffusion_models/{MODEL_FILES['diffusion_model']}` (or the 4B file)",
        f"- `models/text_encoders/{MODEL_FILES['text_encoder']}` (Qwen3-8B; Qwen3-4B for 4B; fp8 files work)",
        f"- `models/vae/{MODEL_FILES['vae']}`",
        "",
        "Or a diffusers folder in `models/diffusers/` (the `diffusers_model` list wins over the three files).",
    ]
)

BASE_NOTE = (
    f"**Base sampling**: Klein Base is undistilled. Preview at about **{PRESET.sample_steps} sample steps** "
    f"with real **CFG {PRESET.cfg:g}**; fewer steps or CFG near 1 make a good LoRA look weak or noisy."
)

TRAIN_NOTE = "\n".join(
    [
        "## Klein LoRA: train, then preview",
        "",
        "1. Put your images (optionally with same-name `.txt` captions) in a subfolder of `ComfyUI/input/`, choose it "
        "in **Klein Caption Dataset** and type a rare **trigger** word. "
        "`[trigger]` in captions and prompts becomes it.",
        "2. **Repeats Calculator**: the dose. S = ceil(N·R/(B·G)) training steps give each of the N images R repeats; "
        "N comes from the dataset, S goes to the trainer (both linked).",
        f"3. **Trainer**, starter preset for 9B Base: {PRESET.resolution} px, LR {PRESET.learning_rate:g}, rank "
        f"{PRESET.rank}, batch {PRESET.batch_size}, grad accum {PRESET.grad_accum}, {PRESET.target_repeats:g} repeats "
        "per image. Its chart shows the loss, the validation loss, s/step, ETA and the health verdict live.",
        "4. **Preview**: one row per checkpoint (first a no-LoRA control row), one column per prompt, one seed. "
        "**Report**: collapse check, advice and the best checkpoint.",
        "5. Re-queueing with the same inputs is cached (nothing retrains); "
        "change the trainer's **seed** to train again.",
        "",
        "LoRAs land in `output/klein_lora/<output_name>/` and `models/loras/klein/` (for LoraLoader).",
        "",
        MODELS_NOTE,
        "",
        BASE_NOTE,
    ]
)

PREVIEW_NOTE = "\n".join(
    [
        "## Klein LoRA: preview an existing LoRA",
        "",
        "A grid at one seed: a no-LoRA control row, the LoRA at strength 1, then the strength sweep (`strengths`). "
        "Reads our LoRAs and diffusers/peft, ai-toolkit and kohya files from `models/loras/`. An empty `trigger` "
        "uses the word the LoRA file records.",
        "",
        MODELS_NOTE,
        "",
        BASE_NOTE,
    ]
)

PLAN_NOTE = "\n".join(
    [
        "## Klein LoRA: plan a run",
        "",
        "The dose of an identity LoRA is **repeats per image**, not raw steps: S = ceil(N·R/(B·G)) training steps "
        "(optimizer updates) give each of N images R repeats at batch size B and grad accum G.",
        "",
        "Same dose, two ways: grad accum 4 needs a quarter of the training steps.",
        "",
        f"Bands: below 50 under-trained, 50-90 normal identity, 90-120 high likeness ({PRESET.target_repeats:g} is the "
        "starter), above 120 over-training risk. The summary adds a VRAM and time estimate.",
        "",
        "To count a real dataset, link a Klein Caption Dataset's `image_count` into `image count`.",
    ]
)

TRAINER_DEFAULTS = {
    "diffusers_model": "(none)", **MODEL_FILES,
    "batch_size": PRESET.batch_size, "grad_accum": PRESET.grad_accum, "learning_rate": PRESET.learning_rate,
    "rank": PRESET.rank, "save_every": 250, "seed": 0, "preview_prompts": PRESET.default_caption,
    "output_name": "my_character", "gradient_checkpointing": False, "stop_on_collapse": False,
    "regularization_weight": PRESET.regularization_weight, "continue_from": "(none)",
}  # fmt: skip
PREVIEW_DEFAULTS = {
    "prompts": "", "trigger": "", "sample_steps": PRESET.sample_steps, "cfg": PRESET.cfg, "seed": PRESET.preview_seed,
    "width": 0, "height": 0, "checkpoints": "all", "strengths": "",
}  # fmt: skip

CALCULATOR_DEFAULTS = {
    "target_repeats": PRESET.target_repeats, "batch_size": PRESET.batch_size, "grad_accum": PRESET.grad_accum,
    "variant": "9B", "resolution": PRESET.resolution,
}  # fmt: skip
NO_MODEL = "(none)"


def node(key: str, node_type: str, pos: list, size: list, **rest) -> dict:
    """One node of a spec: its key (for links), type, place and size, then ``widgets``, ``title`` or ``text``."""
    return {"key": key, "type": node_type, "pos": pos, "size": size, **rest}


def note(pos: list, size: list, text: str) -> dict:
    return node("note", "MarkdownNote", pos, size, text=text)


def save_image(pos: list, prefix: str) -> dict:
    return node("save", "SaveImage", pos, [420, 560], widgets={"filename_prefix": prefix})


WORKFLOWS = {
    "train_then_preview": {
        "nodes": [
            note([0, 0], [620, 560], TRAIN_NOTE),
            node(
                "dataset",
                "KleinCaptionDataset",
                [0, 680],
                [300, 330],
                widgets={"folder": "my_character", "trigger": TRIGGER, "resolutions": str(PRESET.resolution)},
            ),
            node("calculator", "KleinRepeatsCalculator", [340, 680], [280, 230], widgets=CALCULATOR_DEFAULTS),
            node("trainer", "KleinLoRATrainer", [660, 0], [420, 760], widgets=TRAINER_DEFAULTS),
            node(
                "preview",
                "KleinBasePreviewSampler",
                [1120, 0],
                [400, 560],
                widgets={
                    "diffusion_model": NO_MODEL,
                    "text_encoder": NO_MODEL,
                    "vae": NO_MODEL,
                    "lora": NO_MODEL,
                    **PREVIEW_DEFAULTS,
                },
            ),
            node("report", "KleinTrainingReport", [1120, 660], [400, 330]),
            save_image([1560, 0], "klein_lora/preview_grid"),
        ],
        "links": [
            ("dataset", "image_count", "calculator", "images"),
            ("dataset", "dataset", "trainer", "dataset"),
            ("calculator", "training_steps", "trainer", "training_steps"),
            ("trainer", "run", "preview", "run"),
            ("trainer", "run", "report", "run"),
            ("preview", "grid", "save", "images"),
        ],
        "groups": [
            ("1. Dataset and dose", [-20, 600, 660, 440], "#3f789e"),
            ("2. Train", [640, -80, 460, 880], "#8A8"),
            ("3. Preview (Base: 50 sample steps, CFG 4) and health", [1100, -80, 900, 1120], "#a1309b"),
        ],
    },
    "preview_existing_lora": {
        "nodes": [
            note([0, 0], [460, 520], PREVIEW_NOTE),
            node(
                "preview",
                "KleinBasePreviewSampler",
                [500, 0],
                [400, 560],
                widgets={
                    **MODEL_FILES,
                    "lora": "klein/my_character.safetensors",
                    **PREVIEW_DEFAULTS,
                    "prompts": PRESET.default_caption,
                    "strengths": "0.8, 1.2",
                },
            ),
            save_image([940, 0], "klein_lora/lora_preview"),
        ],
        "links": [("preview", "grid", "save", "images")],
        "groups": [],
    },
    "plan_only": {
        "nodes": [
            note([0, 0], [420, 400], PLAN_NOTE),
            *(
                node(
                    f"plan_g{grad_accum}",
                    "KleinRepeatsCalculator",
                    [x, 0],
                    [360, 300],
                    title=f"Klein Repeats Calculator (grad accum {grad_accum})",
                    widgets={"images": 55, **CALCULATOR_DEFAULTS, "batch_size": 1, "grad_accum": grad_accum},
                )
                for grad_accum, x in ((1, 460), (4, 860))
            ),
        ],
        "links": [],
        "groups": [],
    },
}

BUILD_JS = r"""
(async (spec) => {
  const graph = app.graph;
  graph.clear();
  const made = {};
  for (const item of spec.nodes) {
    const node = LiteGraph.createNode(item.type);
    if (!node) throw new Error(`unknown node type ${item.type}`);
    graph.add(node);
    node.pos = item.pos;
    if (item.title) node.title = item.title;
    if (item.text !== undefined) node.widgets[0].value = item.text;
    for (const [name, value] of Object.entries(item.widgets || {})) {
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget) throw new Error(`${item.type} has no widget ${name}`);
      widget.value = value;
    }
    made[item.key] = node;
  }
  for (const [from, output, to, input] of spec.links) {
    const a = made[from], b = made[to];
    const slot = a.outputs.findIndex((o) => o.name === output);
    const target = b.inputs.findIndex((i) => i.name === input);
    if (slot < 0 || target < 0) throw new Error(`no socket ${from}.${output} -> ${to}.${input}`);
    if (!a.connect(slot, b, target)) throw new Error(`cannot link ${from}.${output} -> ${to}.${input}`);
  }
  for (const [title, bounding, color] of spec.groups) {
    const group = new LiteGraph.LGraphGroup(title);
    group.color = color;
    graph.add(group);
    group.pos = [bounding[0], bounding[1]];
    group.size = [bounding[2], bounding[3]];
  }
  // Sizes last: connecting or adding widgets may recompute them.
  for (const item of spec.nodes) made[item.key].setSize(item.size);
  graph.setDirtyCanvas(true, true);
  const ui = graph.serialize();
  const api = (await app.graphToPrompt()).output;
  return { ui, api };
})
"""


def add_placeholders(server: ComfyServer) -> None:
    """Empty model files and a one-image dataset with the example's names, so the lists hold the example's values
    and the thumbnails show no "missing model" errors. Only the names matter; nothing is ever loaded."""
    from klein_core.tools.sample_data import make_sample_dataset

    for kind, name in (
        ("diffusion_models", MODEL_FILES["diffusion_model"]),
        ("text_encoders", MODEL_FILES["text_encoder"]),
        ("vae", MODEL_FILES["vae"]),
        ("loras", "klein/my_character.safetensors"),
    ):
        path = server.models_dir / kind / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    make_sample_dataset(server.input_dir / "my_character", count=1, size=64)


def fit_and_screenshot(browser: Browser, out_png: Path) -> dict:
    view = browser.fit_graph()
    browser.screenshot(out_png)
    return view


def write_thumbnail(png: Path, view: dict, jpg: Path) -> None:
    from PIL import Image

    image = Image.open(png).convert("RGB")
    x, y, w, h = view["box"]
    pad = 16
    crop = image.crop(
        (
            max(0, int(x) - pad),
            max(0, int(y) - pad),
            min(image.width, int(x + w) + pad),
            min(image.height, int(y + h) + pad),
        )
    )
    crop.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
    buffer = io.BytesIO()
    crop.save(buffer, "JPEG", quality=85, optimize=True)
    jpg.write_bytes(buffer.getvalue())


def main() -> None:
    executable = find_chromium()
    if executable is None:
        sys.exit("no chromium found: apt-get install -y chromium")
    env = prepare_comfy_env()
    server = ComfyServer(env, Path(tempfile.mkdtemp(prefix="klein-build-examples-")))
    browser = Browser(executable)
    try:
        server.start()
        add_placeholders(server)
        browser.start()
        browser.open_comfyui(server)
        for name, spec in WORKFLOWS.items():
            built = browser.evaluate(f"{BUILD_JS}({json.dumps(spec)})")
            ui = built["ui"]
            ui.setdefault("extra", {})["klein_lora"] = {
                "built_by": "tests/workflows/build_examples.py",
                "frontend_comfyui": env.version,
            }
            (EXAMPLES_DIR / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
            (API_DIR / f"{name}.api.json").write_text(json.dumps(built["api"], indent=2, sort_keys=True) + "\n")
            png = Path(tempfile.mkdtemp()) / f"{name}.png"
            write_thumbnail(png, fit_and_screenshot(browser, png), EXAMPLES_DIR / f"{name}.jpg")
            print(f"wrote example_workflows/{name}.json, .jpg and tests/workflows/{name}.api.json")
    finally:
        browser.stop()
        server.stop()


if __name__ == "__main__":
    main()
