"""Named moments at which a test can SIGKILL the trainer, to prove that a kill at any moment leaves a run that
resumes. ``KLEIN_LORA_CRASH_AT=name`` kills the process the first time it passes ``name``; ``name#k`` the k-th time.
Unset (always, outside the kill-safety tests) a crash point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

ENV = "KLEIN_LORA_CRASH_AT"
_passed: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here when ``$KLEIN_LORA_CRASH_AT`` names this passage of ``name``: no handler, no
    cleanup, exactly what an out-of-memory kill or a closed ComfyUI does."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    target, _, count = wanted.partition("#")
    if target != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
