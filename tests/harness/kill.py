"""`klein-lora train` in a child process that SIGKILLs itself at a named moment (klein_core/crashpoint.py).

The children fork from one forkserver that imported the CLI once: a kill test then pays for training up to its kill
point, not for a fresh interpreter importing torch and diffusers (seconds of CPU each). The forkserver never ran a
tensor operation, so its children start with clean thread pools; each child is a real process killed by a real
SIGKILL, with no handler and no cleanup.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

from klein_core.cli import main
from klein_core.crashpoint import ENV

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])
KILL_TIMEOUT_S = 1200  # generous: the machine is shared


def _train_until_killed(args: list[str], kill_at: str, log: str) -> None:
    """The child: its output to ``log``, then the CLI with the crash point armed."""
    with open(log, "ab", buffering=0) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    os.environ[ENV] = kill_at
    sys.exit(main(args))


def killed_run(args: list[str], kill_at: str, log: Path) -> int:
    """Run ``klein-lora <args>`` until it kills itself at ``kill_at``; returns its exit code (-SIGKILL when it did)."""
    child = _CONTEXT.Process(target=_train_until_killed, args=(args, kill_at, str(log)))
    child.start()
    child.join(KILL_TIMEOUT_S)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise AssertionError(f"klein-lora {' '.join(args)} still running after {KILL_TIMEOUT_S} s; log {log}")
    return child.exitcode
