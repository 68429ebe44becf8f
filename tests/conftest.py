"""Shared fixtures: the tiny Klein model (built offline at run time, cached) and the sample dataset.

Nothing here fakes ComfyUI; tests that need the real one use the server harness or skip.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def cache_root() -> Path:
    return Path(os.environ.get("KLEIN_LORA_CACHE", Path.home() / ".cache" / "klein-lora"))


def _tiny_key(seed: int, distilled: bool) -> str:
    import klein_core.model.keymap
    import klein_core.tools.tiny

    h = hashlib.sha256()
    for module in (klein_core.tools.tiny, klein_core.model.keymap):
        h.update(Path(module.__file__).read_bytes())
    h.update(f"{seed}-{distilled}".encode())
    return h.hexdigest()[:12]


def tiny_model_dir(seed: int = 0, distilled: bool = False) -> Path:
    """Build (once per source version) a tiny Klein in both formats and return its folder."""
    from klein_core.atomic import atomic_write_bytes
    from klein_core.tools.tiny import make_tiny

    folder = cache_root() / "tiny" / _tiny_key(seed, distilled)
    if not (folder / "complete").exists():
        make_tiny(folder, fmt="both", distilled=distilled, seed=seed)
        atomic_write_bytes(folder / "complete", b"ok")
    return folder


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_diffusers(tiny_model) -> Path:
    return tiny_model / "diffusers"


@pytest.fixture(scope="session")
def tiny_comfy_files(tiny_model) -> dict[str, Path]:
    from klein_core.tools.tiny import COMFY_FILES

    root = tiny_model / "comfyui"
    return {name: root / rel for name, rel in COMFY_FILES.items() if (root / rel).exists()}


# ---- real ComfyUI server (tests marked comfy_server); see tests/harness/comfyui.py -----------------------------
from harness.comfyui import comfy_assets, comfy_env, comfy_server, pytest_terminal_summary  # noqa: E402,F401  (fixtures, hook)

REPO_ROOT = Path(__file__).resolve().parent.parent


class _RepoRootIsNotATestPackage:
    """The repo root holds ComfyUI's ``__init__.py`` entry point, which only imports inside ComfyUI.

    pytest would collect the root as a Package and import that file (as a module named after the checkout folder);
    collecting it as a plain directory instead keeps pytest away from it. Registered as a global plugin because a
    conftest's own hooks do not see its parent directory.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path).resolve() == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_RepoRootIsNotATestPackage(), "klein-repo-root-is-not-a-test-package")


# ---- the generated sample dataset and a quick tiny training run ------------------------------------------------------
@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """Six small images of the procedurally drawn character, with captions (generated, never committed)."""
    from klein_core.tools.sample_data import make_sample_dataset

    folder = tmp_path_factory.mktemp("sample_dataset")
    make_sample_dataset(folder, count=6, seed=0, size=96)
    return folder


def quick_config(**changes):
    """A few training steps at 64 px on the tiny model: the full code path in seconds."""
    from klein_core.train.config import TrainConfig

    # health_preview_every=1: a preview at every checkpoint, which the health tests read (the automatic choice
    # would thin out the tiny runs' frequent checkpoints; tests/test_estimate.py covers it)
    base = dict(training_steps=4, learning_rate=1e-3, rank=4, save_every=2, seed=0, health_preview_every=1)
    base.update(changes)
    return TrainConfig(**base)


def quick_spec(folder, **changes):
    from klein_core.data.spec import DatasetSpec

    return DatasetSpec(folder=str(folder), trigger="kleinchar", resolutions=(64,), **changes)


def quick_cli_train_args(model, images, cache, *more: str) -> list[str]:
    """``klein-lora train`` arguments for the tiny model at 64 px, rank 4, with the JSON summary; ``more`` adds the
    run's own (--out, --training-steps, ...)."""
    return [
        *("train", "--model", str(model), "--images", str(images), "--trigger", "kleinchar"),
        *("--resolution", "64", "--rank", "4", "--cache-dir", str(cache), "--json"),
        *more,
    ]


@pytest.fixture(scope="session")
def training_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedding_cache")
