"""The ``klein-lora`` command line: a thin front over ``klein_core``.

Each subcommand lives in its own module with ``register(subparsers)``; the module sets ``func`` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import KleinError

COMMAND_MODULES = ("plan", "fitcheck", "models", "dataset", "train", "preview", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klein-lora",
        description="Train and preview FLUX.2 [klein] Base character LoRAs. "
        "Training steps = optimizer updates; sample steps = denoising steps of a preview.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KleinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
