"""Headless Chromium driven over the DevTools protocol (raw CDP on websocket-client), for tests marked ``browser``.

Debian's ``chromium`` (``apt-get install chromium``; .ci/run installs it) with the flags of shared/comfyui-ci.md. One
page target; ``evaluate`` runs JavaScript in it and returns JSON values; ``screenshot`` writes a PNG. The browser runs
in its own process group and is stopped by its PID.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness.comfyui import REPO_ROOT, free_port

ARTIFACTS_DIR = Path(os.environ.get("KLEIN_ARTIFACTS_DIR", REPO_ROOT / "artifacts"))  # git-ignored
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = (1600, 1000)
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,  # no first-run template browser over the canvas
    "Comfy.Minimap.Visible": False,  # (1.49) no minimap over the graph in screenshots
}


def find_chromium() -> str | None:
    explicit = os.environ.get("KLEIN_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


FIT_JS = r"""
((inset) => {
  // Fit every node and group into the window minus the frontend's bars (inset: left, top, right, bottom).
  const nodes = app.graph._nodes, groups = app.graph._groups || app.graph.groups || [];
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  const grow = (x, y, w, h) => {
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  };
  for (const n of nodes)
    grow(n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT);
  for (const g of groups) grow(g.pos[0], g.pos[1], g.size[0], g.size[1]);
  const canvas = app.canvas, rect = canvas.canvas.getBoundingClientRect();
  const [left, top, right, bottom] = inset;
  const width = window.innerWidth - left - right, height = window.innerHeight - top - bottom;
  const scale = Math.min(width / (x1 - x0), height / (y1 - y0), 1.2);
  canvas.ds.scale = scale;
  // screen = (graph + offset) * scale + rect.left
  canvas.ds.offset[0] = (left + (width - scale * (x1 - x0)) / 2 - rect.left) / scale - x0;
  canvas.ds.offset[1] = (top + (height - scale * (y1 - y0)) / 2 - rect.top) / scale - y0;
  canvas.setDirty(true, true);
  const sx = rect.left + (x0 + canvas.ds.offset[0]) * scale, sy = rect.top + (y0 + canvas.ds.offset[1]) * scale;
  return { scale, box: [sx, sy, scale * (x1 - x0), scale * (y1 - y0)] };
})
"""


class JavaScriptError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page, driven by CDP commands."""

    def __init__(self, executable: str, viewport: tuple[int, int] = VIEWPORT):
        self.executable = executable
        self.viewport = viewport
        self.port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="klein-chromium-"))
        self.process: subprocess.Popen | None = None
        self._socket = None
        self._next_id = 0
        self.console: list[str] = []  # console messages and uncaught exceptions, for failure messages

    def start(self, timeout_s: float = 60) -> None:
        width, height = self.viewport
        self.process = subprocess.Popen(
            [self.executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             "--disable-dev-shm-usage", f"--window-size={width},{height}", f"--user-data-dir={self.profile}",
             f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        targets = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.executable} exited with code {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2) as response:
                    targets = [t for t in json.load(response) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        if not targets:
            self.stop()
            raise RuntimeError(f"Chromium's DevTools endpoint did not come up within {timeout_s} s")
        import websocket  # websocket-client

        self._socket = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.send("Runtime.enable")
        self.send("Page.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def stop(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            except Exception:
                pass
            self._socket = None
        process = self.process
        if process is not None and process.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(10)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.profile, ignore_errors=True)

    # ---- CDP --------------------------------------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, timeout_s: float = 60) -> dict:
        self._next_id += 1
        message_id = self._next_id
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout_s
        while True:
            self._socket.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self._socket.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record_event(message)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to {method} within {timeout_s} s")

    def _record_event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append(f"exception: {details.get('exception', {}).get('description', details.get('text'))}")

    def evaluate(self, expression: str, timeout_s: float = 60) -> Any:
        """Evaluate JavaScript (awaiting a returned promise) and return its JSON value."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True, "timeout": int(timeout_s * 1000)},
            timeout_s=timeout_s + 5,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise JavaScriptError(f"{text}\nwhile evaluating: {expression[:500]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 30, interval_s: float = 0.2) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except JavaScriptError as exc:
                last_error = exc
            time.sleep(interval_s)
        console = "\n".join(self.console[-20:])
        raise TimeoutError(f"{expression!r} not true within {timeout_s} s (last error: {last_error})\n{console}")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def open_comfyui(self, server, timeout_s: float = 90) -> None:
        """Open the served frontend and wait until the graph and the pack's nodes and chart extension are there.

        The first-run template browser is switched off through the user's settings first (it would cover the canvas).
        """
        for setting, value in FRONTEND_SETTINGS.items():
            status, body = server.request("POST", f"/settings/{setting}", value)
            assert status == 200, f"POST /settings/{setting} -> HTTP {status}: {body!r}"
        self.navigate(server.base_url + "/")
        self.wait_for(
            "window.app && app.graph && window.LiteGraph && "
            "'KleinLoRATrainer' in LiteGraph.registered_node_types && !!window.KleinTrainingCharts",
            timeout_s,
        )
        time.sleep(1.0)  # the canvas and late dialogs settle
        self.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'})); true")

    def fit_graph(self, inset: tuple[int, int, int, int] = (80, 70, 30, 30)) -> dict:
        """Zoom and pan so every node and group is in view; returns the scale and the graph's box on screen."""
        view = self.evaluate(f"{FIT_JS}({list(inset)})")
        time.sleep(0.8)  # DOM widgets (text areas, the chart) follow the canvas on the next frames
        return view

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
