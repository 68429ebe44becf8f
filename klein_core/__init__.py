"""Klein LoRA Trainer core: planning, data, model loading, training, sampling and health for FLUX.2 [klein] Base.

Importable and usable without ComfyUI; the ComfyUI nodes in ``nodes/`` and the ``klein-lora`` CLI are thin
fronts over these modules.
"""

__version__ = "0.1.0"
