"""Run the pack inside a REAL ComfyUI server on loopback, for tests marked ``comfy_server``.

The server runs in its own virtual environment (built by tests/setup_comfyui.sh from $COMFYUI_DIR or from PyPI),
never in the test interpreter. The pack is mounted the way a user installs it: a folder in ``custom_nodes`` (here a
symlink to this repository named ``klein-lora-trainer``), found through ``extra_model_paths`` ``custom_nodes:``.
Models, input, output, temp and user folders are temporary. The server is stopped by its PID whatever happens.

Use the session fixture ``comfy_server`` (a ``ComfyServer``); ``comfy_env`` gives the tree and its interpreter.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"
SETUP_SCRIPT = TESTS_DIR / "setup_comfyui.sh"
SHIM_DIR = TESTS_DIR / "comfy_shim"  # sitecustomize.py: on the server's PYTHONPATH only
PACK_DIR_NAME = "klein-lora-trainer"  # the folder name a user's custom_nodes/ would hold
SETUP_TIMEOUT_S = 1200  # first build of the server venv (pip); later runs take well under a second
START_TIMEOUT_S = 120  # 0.3.75 is ready in ~7 s on 2 cores, newer trees in ~10-15 s
STARTED_SERVERS: list[ComfyServer] = []  # for the closing summary line


@dataclass(frozen=True)
class ComfyEnv:
    """A ComfyUI tree and the interpreter of its own venv."""

    tree: Path
    version: str
    python: Path

    def server_pythonpath(self) -> str:
        """PYTHONPATH for processes that run ComfyUI code: the torchvision shim, then the tree itself."""
        return os.pathsep.join([str(SHIM_DIR), str(self.tree)])

    def run_python(self, *args: str, timeout: float, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """Run this venv's interpreter on ``args`` from the repository root, with the server's PYTHONPATH, output
        captured and no stdin: for code that must meet the real ComfyUI rather than the test interpreter's packages.
        ``unset`` names environment variables the child must not inherit."""
        env = dict(os.environ, PYTHONPATH=self.server_pythonpath(), PYTHONDONTWRITEBYTECODE="1")
        for name in unset:
            env.pop(name, None)
        command = [str(self.python), *args]
        return subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )


def prepare_comfy_env() -> ComfyEnv:
    """Run tests/setup_comfyui.sh (idempotent) and return what it built. Honours $COMFYUI_DIR."""
    completed = subprocess.run(
        ["bash", str(SETUP_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{SETUP_SCRIPT} failed (exit {completed.returncode}):\n"
            f"{completed.stderr[-4000:]}{completed.stdout[-2000:]}"
        )
    values = dict(line.split("=", 1) for line in completed.stdout.splitlines() if "=" in line)
    return ComfyEnv(
        tree=Path(values["COMFYUI_TREE"]),
        version=values["COMFYUI_VERSION"],
        python=Path(values["COMFYUI_PYTHON"]),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PromptRejected(Exception):
    """POST /prompt answered with an error (validation failed, unknown node type, no outputs)."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"/prompt rejected with HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


class EventReader:
    """The server's websocket events for one client id: ``{"type": ..., "data": ...}`` dicts.

    Binary frames (preview images) are returned as ``{"type": "binary", "data": bytes}``.
    """

    def __init__(self, port: int, client_id: str, timeout_s: float = 30.0):
        import websocket  # websocket-client, from the project's test extra

        self.client_id = client_id
        self.received: list[dict] = []
        self._socket = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={client_id}", timeout=timeout_s)

    def next_event(self, timeout_s: float) -> dict:
        import websocket

        self._socket.settimeout(timeout_s)
        opcode, payload = self._socket.recv_data()
        if opcode == websocket.ABNF.OPCODE_BINARY:
            event = {"type": "binary", "data": payload}
        else:
            event = json.loads(payload.decode("utf-8"))
        self.received.append(event)
        return event

    def wait_for(self, predicate: Callable[[dict], bool], timeout_s: float) -> dict:
        """Read events until one matches; raises TimeoutError listing what came instead."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [event["type"] for event in self.received]
                raise TimeoutError(f"no matching websocket event within {timeout_s} s; received {seen}")
            try:
                event = self.next_event(left)
            except Exception as exc:  # websocket timeout
                if "timed out" in str(exc).lower():
                    continue
                raise
            if predicate(event):
                return event

    def wait_until_prompt_done(self, prompt_id: str, timeout_s: float) -> list[dict]:
        """Events of ``prompt_id`` up to ComfyUI's end marker (``executing`` with node None)."""

        def done(event: dict) -> bool:
            data = event.get("data")
            return (
                event["type"] == "executing"
                and isinstance(data, dict)
                and data.get("node") is None
                and data.get("prompt_id") == prompt_id
            )

        self.wait_for(done, timeout_s)
        return [
            event
            for event in self.received
            if isinstance(event.get("data"), dict) and event["data"].get("prompt_id") == prompt_id
        ]

    def close(self) -> None:
        self._socket.close()


class ComfyServer:
    """One ComfyUI server process with the pack mounted, plus small HTTP/websocket helpers."""

    def __init__(self, env: ComfyEnv, workdir: Path):
        self.env = env
        self.workdir = workdir
        self.port = free_port()
        self.models_dir = workdir / "models"
        self.input_dir = workdir / "input"
        self.output_dir = workdir / "output"
        self.temp_dir = workdir / "temp"
        self.user_dir = workdir / "user"
        self.custom_nodes_dir = workdir / "custom_nodes"
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle --------------------------------------------------------------------------------------------------
    def _write_layout(self) -> Path:
        for folder in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir, self.custom_nodes_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for kind in ("diffusion_models", "text_encoders", "vae", "loras", "checkpoints", "diffusers"):
            (self.models_dir / kind).mkdir(parents=True, exist_ok=True)
        (self.custom_nodes_dir / PACK_DIR_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
        extra = self.workdir / "extra_model_paths.yaml"
        # is_default: these folders come first, so files the pack saves (models/loras/klein/) land here and never in
        # the ComfyUI tree's own models/ folder.
        lines = [
            "klein_tests:",
            f"    base_path: {self.workdir}",
            "    is_default: true",
            "    custom_nodes: custom_nodes",
        ]
        lines += [
            f"    {kind}: models/{kind}"
            for kind in ("diffusion_models", "text_encoders", "vae", "loras", "checkpoints", "diffusers")
        ]
        extra.write_text("\n".join(lines) + "\n")
        return extra

    def command(self, extra_yaml: Path) -> list[str]:
        return [
            str(self.env.python), str(self.env.tree / "main.py"),
            "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
            "--extra-model-paths-config", str(extra_yaml),
            "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
            "--temp-directory", str(self.temp_dir), "--user-directory", str(self.user_dir),
            "--database-url", "sqlite:///:memory:",
            # Only this pack: a user's other custom nodes must not decide our result.
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_DIR_NAME,
        ]  # fmt: skip

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        extra_yaml = self._write_layout()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(SHIM_DIR)
        env["PYTHONUNBUFFERED"] = "1"
        # One torch thread: the tiny test model gains nothing from more, and on a busy 2-core machine OpenMP's
        # spinning threads made each forward ~20x slower (measured 0.1 s vs 2.8 s).
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("COMFYUI_DIR", None)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(extra_yaml),
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends it and any child by this PID
            )
        atexit.register(self.stop)
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.process.returncode} during startup:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/system_stats", timeout=2) as response:
                    if response.status == 200:
                        self.startup_seconds = time.monotonic() - started
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"ComfyUI was not ready within {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server by its PID (its whole process group), whatever state it is in."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    # ---- HTTP -------------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout_s: float = 30) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(
            f"{self.base_url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError):  # an image from /view, or plain text
            return status, raw

    def get_json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path} -> HTTP {status}: {body!r}"
        return body

    def object_info(self, node_id: str | None = None) -> dict:
        """``/object_info`` (all nodes) or the entry of one node id ({} when unknown)."""
        if node_id is None:
            return self.get_json("/object_info")
        return self.get_json(f"/object_info/{urllib.parse.quote(node_id)}").get(node_id, {})

    def post_prompt(self, api_prompt: dict, client_id: str | None = None) -> tuple[int, dict]:
        """POST /prompt and return (HTTP status, body) without judging it."""
        return self.request("POST", "/prompt", {"prompt": api_prompt, "client_id": client_id or uuid.uuid4().hex})

    def queue(self, api_prompt: dict, client_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its prompt_id, raises PromptRejected when ComfyUI refuses it."""
        status, body = self.post_prompt(api_prompt, client_id)
        if status != 200 or body.get("node_errors"):
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def wait_history(self, prompt_id: str, timeout_s: float = 60) -> dict:
        """Poll /history until the prompt is finished (success, error or interrupted) and return its entry."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout_s} s:\n{self.log_tail()}")

    def run(self, api_prompt: dict, timeout_s: float = 60) -> dict:
        """Queue a prompt, wait for it, and return its history entry."""
        return self.wait_history(self.queue(api_prompt), timeout_s)

    def interrupt(self) -> None:
        status, body = self.request("POST", "/interrupt", {})
        assert status == 200, f"/interrupt -> HTTP {status}: {body!r}"

    @contextmanager
    def events(self, client_id: str | None = None) -> Iterator[EventReader]:
        """Listen to the websocket; queue with ``client_id=reader.client_id`` to get that prompt's events."""
        reader = EventReader(self.port, client_id or uuid.uuid4().hex)
        try:
            yield reader
        finally:
            reader.close()

    # ---- log ---------------------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]


def import_pack(package_name: str = "klein_lora_trainer") -> ModuleType:
    """Import this repository as a package named by its folder, the way ComfyUI does (so relative imports work).

    Needs a real ``comfy_api`` on sys.path: the root ``__init__`` imports it.
    """
    if package_name in sys.modules:
        return sys.modules[package_name]
    spec = importlib.util.spec_from_file_location(
        package_name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[package_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[package_name]
        raise
    return module


def import_pack_module(dotted: str, package_name: str = "klein_lora_trainer") -> ModuleType:
    """``import_pack_module("nodes.calculator_node")`` -> the pack's module, relative imports resolved."""
    import_pack(package_name)
    return importlib.import_module(f"{package_name}.{dotted}")


def require_comfy_api() -> None:
    """Skip (never fake) when this interpreter cannot import ComfyUI's node API."""
    try:
        importlib.import_module("comfy_api.latest")
    except Exception as exc:  # ImportError, or a ComfyUI dependency missing from this interpreter
        pytest.skip(
            "ComfyUI's comfy_api is not importable in this interpreter "
            f"({type(exc).__name__}: {exc}); test_comfy_server.py runs this file inside the real ComfyUI's venv"
        )


# ---- pytest fixtures (imported by tests/conftest.py) ----------------------------------------------------------------
@pytest.fixture(scope="session")
def comfy_env() -> ComfyEnv:
    return prepare_comfy_env()


@pytest.fixture(scope="session")
def comfy_server(comfy_env: ComfyEnv) -> Iterator[ComfyServer]:
    workdir = Path(tempfile.mkdtemp(prefix="klein-comfy-"))
    server = ComfyServer(comfy_env, workdir)
    STARTED_SERVERS.append(server)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if os.environ.get("KLEIN_KEEP_COMFY_WORKDIR"):
            print(f"ComfyUI work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True)
class ComfyAssets:
    """The tiny Klein and a small sample dataset, placed in the session server's folders."""

    server: ComfyServer
    dataset_folder: str  # a subfolder of the server's input directory
    diffusion_model: str  # names as ComfyUI's model lists show them
    text_encoder: str
    vae: str

    @property
    def model_inputs(self) -> dict[str, str]:
        return {"diffusion_model": self.diffusion_model, "text_encoder": self.text_encoder, "vae": self.vae}


ASSET_DATASET = "klein_workflow_dataset"


def place_tiny_klein(server: ComfyServer) -> ComfyAssets:
    """Copy the tiny Klein (ComfyUI layout: diffusion model, text encoder with its tokenizer folder beside it, VAE)
    into the server's models/ tree and write 4 sample images of 96 px into input/<ASSET_DATASET>/."""
    from conftest import tiny_model_dir  # the cached tiny model build

    from klein_core.tools.sample_data import make_sample_dataset
    from klein_core.tools.tiny import COMFY_FILES

    source = tiny_model_dir() / "comfyui"
    for kind in ("diffusion_models", "text_encoders", "vae"):
        shutil.copytree(source / kind, server.models_dir / kind, dirs_exist_ok=True)
    folder = server.input_dir / ASSET_DATASET
    if not folder.exists():
        make_sample_dataset(folder, count=4, size=96)
    names = {key: Path(COMFY_FILES[key]).name for key in ("transformer", "text_encoder", "vae")}
    return ComfyAssets(server, ASSET_DATASET, names["transformer"], names["text_encoder"], names["vae"])


@pytest.fixture(scope="session")
def comfy_assets(comfy_server: ComfyServer) -> ComfyAssets:
    return place_tiny_klein(comfy_server)


def pytest_terminal_summary(terminalreporter) -> None:
    """Say which ComfyUI the server tests ran against (CI logs and notes need the version)."""
    for server in STARTED_SERVERS:
        ready = f"ready in {server.startup_seconds:.1f} s" if server.startup_seconds else "did not start"
        terminalreporter.write_line(
            f"ComfyUI server tests ran against ComfyUI {server.env.version} ({server.env.tree}), {ready}"
        )
