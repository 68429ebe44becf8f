"""Shared pieces of the benchmarks: versions, device description, random full-size transformers, timing, RSS, and
the figures file a time-limited run appends to."""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repo
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402


def versions() -> dict:
    import diffusers
    import peft
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cuda": torch.version.cuda,
    }
    for name, module in (("torchao", "torchao"), ("optimum-quanto", "optimum.quanto")):
        try:
            out[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - optional
            out[name] = None
    return out


def device_info(device: str) -> dict:
    info = {
        "device": device,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            name=props.name, memory_gib=round(props.total_memory / 2**30, 2), capability=f"{props.major}.{props.minor}"
        )
    else:
        info.update(name=f"CPU ({platform.processor() or platform.machine()})", memory_gib=None)
    return info


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    """Free what is unreferenced and start a new peak: each figure's peak is its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    """Peak GiB allocated (live tensors) and reserved (the caching allocator's hold) since the last reset."""
    if not device.startswith("cuda"):
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def time_call(fn, device: str, repeats: int = 1) -> float:
    """Mean wall seconds of ``fn()`` over ``repeats`` calls, with the device synchronised around them."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def random_transformer(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A ``Flux2Transformer2DModel`` of ``config`` with random weights, built on the meta device and materialised
    directly on ``device`` (no full-size CPU init, no download): Linear weights ~ N(0, 1/fan_in), norm weights 1."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]), generator=generator)
            else:
                param.fill_(1.0)
    return model.eval().requires_grad_(False)


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FigureLog:
    """Appends each figure as one JSON line to ``folder/gpu_figures.jsonl`` the moment it is measured (flushed and
    fsync'd), so a run stopped by a time-out keeps everything it had measured. Without a folder it writes nothing."""

    FILE_NAME = "gpu_figures.jsonl"

    def __init__(self, folder: Path | None):
        self.path = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / self.FILE_NAME
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the log was opened (the run's start, for its time budget)."""
        return time.perf_counter() - self.started

    def add(self, row: dict) -> None:
        if self.path is None:
            return
        line = json.dumps({**row, "elapsed_s": round(self.elapsed(), 1)}, default=str)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
