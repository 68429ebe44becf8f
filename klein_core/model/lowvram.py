"""Low-VRAM mode: an 8-bit base transformer with the LoRA trained on top.

The block Linear weights (96 % of Klein's parameters) are stored as int8, weight-only, one scale per output row, and
dequantised per layer inside each matmul; embedders, modulation and norms stay in bf16. The 9B base drops from 16.9
to ~8.5 GiB, so with gradient checkpointing a 9B LoRA at 1024 px trains in ~13 GiB (see ``estimate.py``). The LoRA
itself stays fp32 and is what is trained and saved: the file is the same as with a bf16 base.

Backends (optional: ``pip install 'klein-lora-trainer[lowvram]'``): **torchao** (``Int8WeightOnlyConfig``;
preferred: PyTorch's own quantisation library, and peft wraps its tensors with a dedicated LoRA layer) or
**optimum-quanto** (``qint8`` weights). Both train on CPU and CUDA. Quantisation is lossy: the base the LoRA sees
differs slightly from the bf16 base it will be used with, which is why gradient checkpointing (exact) is preferred
when it is enough.
"""

from __future__ import annotations

import importlib.util

import torch

from ..errors import ModelError

BACKENDS = ("torchao", "quanto")
INSTALL_HINT = "pip install 'klein-lora-trainer[lowvram]' (or: pip install torchao)"


def backend_available(backend: str) -> bool:
    module = {"torchao": "torchao", "quanto": "optimum.quanto"}[backend]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # "optimum" itself missing
        return False


def available_backends() -> list[str]:
    return [b for b in BACKENDS if backend_available(b)]


def choose_backend(backend: str = "auto") -> str:
    """The backend to use: ``backend`` if installed, or the first installed one for ``"auto"``."""
    if backend != "auto" and backend not in BACKENDS:
        raise ModelError(f"unknown 8-bit backend {backend!r}: use one of auto, {', '.join(BACKENDS)}")
    candidates = BACKENDS if backend == "auto" else (backend,)
    for candidate in candidates:
        if backend_available(candidate):
            return candidate
    wanted = "torchao or optimum-quanto" if backend == "auto" else backend
    raise ModelError(f"the 8-bit base needs {wanted}, which is not installed: {INSTALL_HINT}")


def _quantise_block(block: torch.nn.Module, backend: str) -> None:
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(block, Int8WeightOnlyConfig())
    else:
        from optimum.quanto import freeze, qint8, quantize

        quantize(block, weights=qint8)
        freeze(block)


def blocks_of(transformer) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def enable_block_checkpointing(transformer, blocks: int | None = None) -> None:
    """Gradient checkpointing of ``blocks`` transformer blocks (every block when None), through diffusers'
    ``gradient_checkpointing_func`` hook: a checkpointed block keeps only its input and is recomputed in the backward;
    the others keep their activations and cost no recompute. The automatic mode picks the fewest that fit the card.

    The single-stream blocks are checkpointed first, so the double-stream blocks are the ones left to run plainly:
    every block costs a token the same compute, but a LoRA keeps each adapted layer's input for its weight gradient,
    and a single block's output projection reads a 4·d-wide input (attention and feed-forward side by side). The
    fit-check audit counts a plainly run 9B block's saved activations at 0.64 GiB (double) vs 0.85 GiB (single) at
    1024 px, of which the LoRA adds 0.02 vs 0.18 GiB."""
    import torch.utils.checkpoint

    every = blocks_of(transformer)
    checkpointed = every if blocks is None else every[len(every) - blocks :]
    chosen = {id(block) for block in checkpointed}

    def run(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=run)


def quantize_base_8bit(transformer, device=None, backend: str = "auto") -> str:
    """Quantise the block Linears of a (frozen, LoRA-free) transformer to int8 in place; returns the backend used.

    Call it before ``lora.add_lora``. With ``device``, each block moves there and is quantised there one at a time, so
    a transformer loaded on the CPU reaches the GPU without its full bf16 copy ever being resident on the GPU.
    """
    chosen = choose_backend(backend)
    for block in blocks_of(transformer):
        if device is not None:
            block.to(device)
        _quantise_block(block, chosen)
    if device is not None:
        transformer.to(device)
    return chosen


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """True for a weight held as a quantised tensor subclass (not a plain dense tensor)."""
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return type(data) is not torch.Tensor
