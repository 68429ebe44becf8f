"""A tiny Klein transformer with a trained-looking LoRA attached (B no longer zero), for tests of the LoRA's math."""

from __future__ import annotations

import torch
from diffusers import Flux2Transformer2DModel

from klein_core.model import lora as lora_io
from klein_core.tools.tiny import TINY_TRANSFORMER_CONFIG


def adapted_tiny_transformer(dtype: torch.dtype = torch.float32, rank: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER_CONFIG).to(dtype)
    lora_io.add_lora(transformer, rank=rank)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in lora_io.lora_parameters(transformer):
            param.copy_(torch.randn_like(param) * 0.05)
    return transformer
