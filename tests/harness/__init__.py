"""What the tests drive rather than test: the real ComfyUI (its venv, a server on loopback, the pack imported as
ComfyUI imports it), headless Chromium on that server's frontend, and the script that loads a LoRA with ComfyUI's own
loaders inside that venv. Test files import from here; nothing here is collected as a test."""
