"""Cooperation with ComfyUI's memory management: the pack's cached Klein models leave the GPU when ComfyUI frees it.

The trainer hands its transformer and VAE to the preview node inside the run (``KLEIN_LORA_RUN``), and ComfyUI's node
cache keeps that run alive between prompts. ComfyUI does not know these modules (they are not its ModelPatchers), so
on its own it would never unload them. Every unload path of ComfyUI (0.3.75 to 0.33 checked) goes through
``comfy.model_management.free_memory``:

- ``unload_all_models()``: the ``/free`` endpoint (``unload_models`` / ``free_memory``), the UI's "Unload models" and
  "Free model and node cache" actions, and our trainer before it loads a model;
- ``load_models_gpu()``: another model needs room on the device.

``install()`` wraps that function once: before ComfyUI unloads its own models, our cached runs move to its offload
device (system RAM) when everything is unloaded or the device lacks the memory asked for. The preview node moves a
run back with ``to_device`` for the duration of sampling. "Free model and node cache" also clears the node cache, so
the run itself is dropped and its RAM returned; a ``weakref.finalize`` logs that moment.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref

import torch

LOG_PREFIX = "[Klein LoRA]"
UNLOAD_ALL = 1e29  # ComfyUI's unload_all_models() asks free_memory for 1e30 bytes

_lock = threading.Lock()
# Live runs whose models we manage, by id(run); weak values: ComfyUI's node cache owns the runs.
_runs: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def _modules(run) -> list[torch.nn.Module]:
    return [m for m in (getattr(run, "transformer", None), getattr(run, "vae", None)) if isinstance(m, torch.nn.Module)]


def _device_of(run) -> torch.device | None:
    for module in _modules(run):
        for parameter in module.parameters():
            return parameter.device
    return None


def _size_gib(run) -> float:
    return sum(p.numel() * p.element_size() for m in _modules(run) for p in m.parameters()) / 2**30


def register(run) -> None:
    """Track a run whose transformer and VAE the pack keeps alive (called by the trainer and the preview node)."""
    install()
    with _lock:
        if id(run) in _runs:
            return
        try:
            _runs[id(run)] = run
        except TypeError:  # an object without weak references (a test stand-in): nothing to manage
            return
        label = str(getattr(run, "run_dir", "run"))
        weakref.finalize(run, logging.info, "%s cached Klein run %s released from memory", LOG_PREFIX, label)


def to_device(run, device) -> None:
    """Put a (possibly offloaded) run's models on ``device`` before sampling with them."""
    register(run)
    device = torch.device(device)
    if _device_of(run) != device:
        for module in _modules(run):
            module.to(device)
        logging.info("%s cached Klein run moved to %s for sampling", LOG_PREFIX, device)


def offload(reason: str) -> int:
    """Move every cached run's models to ComfyUI's offload device; returns how many runs were offloaded."""
    import comfy.model_management

    target = torch.device(comfy.model_management.unet_offload_device())
    with _lock:
        runs = list(_runs.values())
    moved = 0
    for run in runs:
        if _device_of(run) not in (None, target):
            for module in _modules(run):
                module.to(target)
            moved += 1
    if moved:
        comfy.model_management.soft_empty_cache()
    logging.info(
        "%s ComfyUI is freeing memory (%s): %d cached Klein run(s), %d moved to %s",
        LOG_PREFIX,
        reason,
        len(runs),
        moved,
        target,
    )
    return moved


def _needs_room(memory_required, device) -> bool:
    if memory_required >= UNLOAD_ALL or device is None:
        return True
    import comfy.model_management

    try:
        return comfy.model_management.get_free_memory(device) < memory_required
    except Exception:  # an unknown device type: give the memory back rather than guess
        return True


def _cached_on(device) -> bool:
    with _lock:
        runs = list(_runs.values())
    if device is None:
        return bool(runs)
    return any(_device_of(run) == torch.device(device) for run in runs)


def _wrap(original):
    @functools.wraps(original)
    def free_memory(memory_required, device, *args, **kwargs):
        try:
            if _runs and (memory_required >= UNLOAD_ALL or _cached_on(device)) and _needs_room(memory_required, device):
                offload("unload all models" if memory_required >= UNLOAD_ALL else "another model needs the device")
        except Exception:  # never let our bookkeeping break ComfyUI's own unloading
            logging.exception("%s could not offload the cached Klein models", LOG_PREFIX)
        return original(memory_required, device, *args, **kwargs)

    free_memory.klein_original = original
    return free_memory


def install() -> None:
    """Wrap ``comfy.model_management.free_memory`` once (idempotent; imported lazily: importing it picks a device)."""
    import comfy.model_management as mm

    with _lock:
        if not hasattr(mm.free_memory, "klein_original"):
            mm.free_memory = _wrap(mm.free_memory)
