"""Custom socket types and inputs shared by the pack's nodes.

Links match on equal type strings, so every type is prefixed ``KLEIN_`` to never meet a core type
(ComfyUI core already has ``LORA_MODEL``, ``LOSS_MAP`` and others). Any Python object can travel on them.
"""

from comfy_api.latest import io

KleinDataset = io.Custom("KLEIN_DATASET")
KleinLoraRun = io.Custom("KLEIN_LORA_RUN")


def fixed_seed_input(default: int, tooltip: str) -> io.Int.Input:
    """A seed input the frontend leaves alone: it would otherwise add "randomize after generate" to any input named
    seed, and every queue would silently train again or render grids that no longer compare."""
    largest = 0xFFFFFFFFFFFFFFFF
    return io.Int.Input("seed", default=default, min=0, max=largest, control_after_generate=False, tooltip=tooltip)
