"""Registry and Manager packaging: what ComfyUI-Manager and the Comfy registry read from this repository.

ComfyUI-Manager pip-installs requirements.txt line by line; the registry reads pyproject.toml (`comfy node validate`,
run by .ci/run). A torch line would replace the user's CUDA build, so none may appear anywhere.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


def requirement_lines() -> list[str]:
    lines = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def package_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_txt_is_exactly_the_project_dependencies():
    assert requirement_lines() == list(PYPROJECT["project"]["dependencies"])


def test_no_torch_build_is_ever_requested():
    requested = requirement_lines() + list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        requested += list(extra)
    assert not {package_name(r) for r in requested} & TORCH_PACKAGES, requested


def test_project_metadata_is_what_the_registry_needs():
    project = PYPROJECT["project"]
    assert project["name"] == "klein-lora-trainer" and "comfyui" not in project["name"].lower()
    assert SEMVER.match(project["version"]), project["version"]
    assert project["description"] and project["license"]
    assert project["urls"]["Repository"].startswith("https://")


def test_tool_comfy_names_the_publisher_the_web_folder_and_the_comfyui_range():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["requires-comfyui"].startswith(">=")
    web = REPO_ROOT / comfy["web"]
    assert (web / "js" / "training_chart.js").is_file()
    assert sorted(p.stem for p in (web / "docs").glob("*.md")) == sorted(
        [
            "KleinRepeatsCalculator",
            "KleinCaptionDataset",
            "KleinLoRATrainer",
            "KleinBasePreviewSampler",
            "KleinTrainingReport",
        ]
    )


def test_web_extension_imports_comfyui_scripts_from_three_levels_up():
    """/extensions/<pack>/js/x.js -> ../../../scripts/app.js; with ../../ it 404s and the extension never loads."""
    for script in (REPO_ROOT / "web").rglob("*.js"):
        imports = re.findall(r'from\s+"([^"]+)"', script.read_text())
        assert imports, script
        for target in imports:
            assert target.startswith("../../../scripts/"), (script.name, target)


def test_entry_point_is_v3_only():
    """A NODE_CLASS_MAPPINGS would make ComfyUI load the pack the V1 way and ignore comfy_entrypoint."""
    tree = ast.parse((REPO_ROOT / "__init__.py").read_text())
    assigned = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert "NODE_CLASS_MAPPINGS" not in assigned and "WEB_DIRECTORY" in assigned
    assert any(isinstance(node, ast.AsyncFunctionDef) and node.name == "comfy_entrypoint" for node in tree.body)
