"""What the LoRA adds to a training step of the frozen model: element-wise memory traffic and saved activations.

On a GPU a training step is bound by its matmuls and by the bytes its element-wise kernels move (casts, norms,
modulation, residual adds); a LoRA that casts every adapted input to fp32, or adds its output in separate passes,
pays in the second. The audit runs the same flow-matching training step (the pack's ``flow_matching_loss`` and
backward) on two fake copies of the released model, the frozen base (its input made to require a gradient, so the
backward runs through every block as it does under a LoRA) and the base with the trainer's LoRA and memory mode, and
compares:

* **element-wise traffic**: bytes read and written by every operator that is neither a matmul, an attention nor a
  convolution kernel, and that creates a new tensor (views and aliases move nothing), counted at dispatch;
* **saved activations**: the bytes autograd keeps for the backward, each storage once, the model's weights left out.

A frozen layer's input gradient needs its weight only; a LoRA's weight gradient needs the layer's input, so a LoRA
keeps each adapted input that nothing else keeps (with per-block checkpointing only the checkpointed blocks' inputs
are kept, for both).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..model.lowvram import enable_block_checkpointing, quantize_base_8bit
from ..train.objective import flow_matching_loss
from .fake_model import GIB, materialise

COMPUTE_KERNELS = ("mm", "addmm", "bmm", "baddbmm", "scaled_dot_product", "convolution")


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


class ElementwiseTraffic(TorchDispatchMode):
    """Counts the bytes that element-wise (memory-bound) operators read and write; ``bytes`` is the total."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(kernel in func.overloadpacket.__name__ for kernel in COMPUTE_KERNELS):
            return out
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        read_storages = {tensor.untyped_storage()._cdata for tensor in inputs}
        written = (
            outputs
            if func._schema.is_mutable
            else [tensor for tensor in outputs if tensor.untyped_storage()._cdata not in read_storages]
        )
        if written:
            self.bytes += sum(tensor.numel() * tensor.element_size() for tensor in (*inputs, *written))
        return out


class SavedActivations:
    """Within :meth:`counting`, the bytes autograd saves for the backward: each storage once, weights left out."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._weights = {param.untyped_storage()._cdata for param in module.parameters()}
        self._storages: dict[int, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self._weights:
            self._storages[storage._cdata] = storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def counting(self) -> Iterator["SavedActivations"]:
        with torch.autograd.graph.saved_tensors_hooks(self._keep, lambda tensor: tensor):
            yield self


@dataclass(frozen=True)
class StepCost:
    """One training step's element-wise bytes (forward and backward) and its saved activations."""

    elementwise_bytes: int
    saved_bytes: int


@dataclass(frozen=True)
class LoraOverhead:
    """The LoRA training step against the frozen model's, same size, resolution and memory mode."""

    frozen: StepCost
    lora: StepCost

    @property
    def traffic_ratio(self) -> float:
        return self.lora.elementwise_bytes / self.frozen.elementwise_bytes

    @property
    def saved_activations_ratio(self) -> float:
        return self.lora.saved_bytes / self.frozen.saved_bytes

    def as_dict(self) -> dict:
        return {
            "frozen_elementwise_gb": self.frozen.elementwise_bytes / 1e9,
            "lora_elementwise_gb": self.lora.elementwise_bytes / 1e9,
            "traffic_ratio": self.traffic_ratio,
            "frozen_saved_activations_gib": self.frozen.saved_bytes / GIB,
            "lora_saved_activations_gib": self.lora.saved_bytes / GIB,
            "saved_activations_ratio": self.saved_activations_ratio,
        }


def training_step_cost(transformer: torch.nn.Module, latents: torch.Tensor, embeds: torch.Tensor) -> StepCost:
    """Count one flow-matching forward and backward (as ``accumulate_gradients`` runs it) on fake tensors."""
    traffic, saved = ElementwiseTraffic(), SavedActivations(transformer)
    noise, sigma = torch.empty_like(latents), torch.empty(latents.shape[0])
    with traffic, saved.counting():
        loss = flow_matching_loss(transformer, latents, embeds, noise, sigma)
        saved_bytes = saved.bytes  # everything the backward will need is saved by the end of the forward
        loss.backward()
    return StepCost(traffic.bytes, saved_bytes)


def lora_overhead(
    frozen: torch.nn.Module, adapted: torch.nn.Module, config, latents: torch.Tensor, embeds: torch.Tensor
) -> LoraOverhead:
    """``adapted``: the fake base as the trainer adapts it (LoRA, memory mode, 8-bit base); ``frozen``: a second copy
    of the base built on ``meta`` (before the fake mode starts: a dtype change inside it would put fake tensors in
    meta modules), given the same memory mode and left frozen. Call inside ``fake_model.fake_tensors``."""
    frozen = materialise(frozen)
    if config.base_8bit:
        quantize_base_8bit(frozen)
    frozen.requires_grad_(False)
    if config.gradient_checkpointing:
        enable_block_checkpointing(frozen, config.checkpointed_blocks)
    frozen.train()
    frozen_cost = training_step_cost(frozen, latents.detach().requires_grad_(), embeds)
    return LoraOverhead(frozen_cost, training_step_cost(adapted, latents, embeds))
