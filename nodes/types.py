"""Custom socket types shared by the pack's nodes.

Links match on equal type strings, so every type is prefixed ``KLEIN_`` to never meet a core type
(ComfyUI core already has ``LORA_MODEL``, ``LOSS_MAP`` and others). Any Python object can travel on them.
"""

from comfy_api.latest import io

KleinDataset = io.Custom("KLEIN_DATASET")
KleinLoraRun = io.Custom("KLEIN_LORA_RUN")
