"""Klein LoRA Trainer: the ComfyUI entry point (node API V3).

ComfyUI imports this folder as a package named after its path, so every import here and in ``nodes/`` is
relative. There is deliberately no ``NODE_CLASS_MAPPINGS``: its presence makes ComfyUI load the pack the V1 way
and ignore ``comfy_entrypoint``. pytest never imports this file (see tests/conftest.py); ``klein_core`` works
without ComfyUI.
"""

from comfy_api.latest import ComfyExtension, io

from .nodes import NODE_CLASSES

WEB_DIRECTORY = "./web"


class KleinLoraExtension(ComfyExtension):
    """Hands ComfyUI the pack's node classes."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> KleinLoraExtension:
    return KleinLoraExtension()
