"""Run INSIDE a ComfyUI venv (tests/test_comfy_lora_loading.py starts it): load a Klein transformer file with ComfyUI's
own diffusion-model loader, apply a LoRA file with its stock LoRA loader, and print a JSON report of what happened.

    python tests/harness/lora_check.py <transformer.safetensors> <lora.safetensors>

Reported: the model class ComfyUI detected, every warning it logged (e.g. "lora key not loaded: ..."), and, per
patched weight, the patched tensor minus the original (saved to an output .safetensors file for the caller to compare
with the delta the LoRA file describes). No assertions here: the test judges the report.
"""

from __future__ import annotations

import json
import logging
import sys


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(transformer_path: str, lora_path: str, deltas_out: str) -> None:
    from comfy.cli_args import args

    args.cpu = True  # as the test server runs; comfy.model_management picks its device at import
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import save_file

    collect = _Collect()
    logging.getLogger().addHandler(collect)
    model = comfy.sd.load_diffusion_model(transformer_path, model_options={"dtype": torch.float32})
    original = {k: v.detach().float().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    lora = comfy.utils.load_torch_file(lora_path)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    patched.patch_model(force_patch_weights=True)
    after = patched.model.diffusion_model.state_dict()
    deltas = {
        k: (after[k].float() - original[k]).contiguous()
        for k in original
        if not torch.equal(after[k].float(), original[k])
    }
    save_file(deltas, deltas_out)
    print(
        json.dumps(
            {
                "model_class": type(model.model).__name__,
                "warnings": collect.messages,
                "patched_keys": sorted(patched.patches),
                "changed_keys": sorted(deltas),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
