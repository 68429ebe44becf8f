"""The model layer: finding and loading Klein checkpoints (diffusers folders, BFL/ComfyUI files), key maps between
the layouts, the LoRA adapter and its files, the 8-bit low-VRAM base, latents and prompt encoding.

Nothing here knows about datasets or training runs.
"""
