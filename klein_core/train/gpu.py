"""Which CUDA card is here, for the estimate and the fit verdict (torch imported only when asked)."""

from __future__ import annotations

from .estimate import GIB


def detect_gpu_memory() -> float | None:
    """Total memory of CUDA device 0 in GiB, or None when there is no CUDA GPU (or no torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def detect_gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
