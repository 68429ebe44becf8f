"""Klein at its released size with no weights and no memory: models built on ``meta``, then materialised as fake
tensors under torch's ``FakeTensorMode``, and torch's ``MemTracker`` taught that a LoRA trains on a frozen base.

The fake tensors live on the CPU device as the GPU's stand-in: on a CPU-only torch build a fake CUDA tensor can be
created and multiplied but not indexed (Python indexing takes a CUDA device guard), and diffusers indexes. The
dtypes, shapes and kernels' saved tensors are what a GPU run has (bf16 weights, fp32 LoRA, fused attention: the
CPU's flash kernel keeps the output and log-sum-exp as CUDA's does); only the device's name differs. What a real
run moves off the GPU (the preview merge's backups) goes to ``OFF_DEVICE``, which the tracker reports apart.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

from ..facts import QWEN3_CONFIGS, KleinShape

STAND_IN_DEVICE = "cpu"  # the GPU's stand-in for the audit's fake tensors
OFF_DEVICE = "meta"  # where the audit puts what a real run keeps in host memory
GIB = 2**30


@contextlib.contextmanager
def fake_tensors() -> Iterator[FakeTensorMode]:
    """Every tensor created inside is fake: shapes, dtypes and devices, no storage. ``allow_non_fake_inputs`` lets
    meta-built modules be materialised inside (``to_empty``). Module conversions (peft's ``.to`` of each new adapter
    layer) assign new parameters instead of swapping tensors, which fake tensors refuse."""
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def meta_transformer(shape: KleinShape, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The released transformer of ``shape`` on ``meta`` (no init, no memory); LoRA and memory modes can be added
    on meta before it is materialised."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        return Flux2Transformer2DModel(**shape.transformer_config).to(dtype)


def meta_vae(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """FLUX.2's VAE (``AutoencoderKLFlux2``'s default config is the released one, 84 M parameters)."""
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        return AutoencoderKLFlux2().to(dtype).eval()


def meta_text_encoder(
    shape: KleinShape, num_hidden_layers: int | None = None, dtype: torch.dtype = torch.bfloat16
) -> torch.nn.Module:
    """The released Qwen3 text encoder of ``shape`` (optionally truncated to its first ``num_hidden_layers``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = dict(QWEN3_CONFIGS[shape.text_encoder])
    if num_hidden_layers is not None:
        config["num_hidden_layers"] = num_hidden_layers
    with torch.device("meta"):
        return Qwen3ForCausalLM(Qwen3Config(**config)).to(dtype).eval()


def materialise(module: torch.nn.Module, device: str = STAND_IN_DEVICE) -> torch.nn.Module:
    """Fake storage for every parameter and buffer of a meta module; call inside :func:`fake_tensors`."""
    return module.to_empty(device=device)


def adapt_fake(transformer: torch.nn.Module, adapt: Callable[[torch.nn.Module], object]) -> None:
    """Run ``adapt`` (which adds a peft LoRA) on a fake, maybe quantised, base, then make the adapter fake too.

    peft moves each new adapter layer with ``.to()``, which fake parameters refuse (they are swapped, not assigned),
    so the adapter is built as small real tensors with the fake mode paused, then given fake storage in place."""
    with unset_fake_temporarily():
        adapt(transformer)
    for sub in transformer.modules():
        if any(type(p.data) is torch.Tensor for p in sub.parameters(recurse=False)):  # real: the new adapter
            sub.to_empty(device=STAND_IN_DEVICE, recurse=False)


class LoraMemTracker(MemTracker):
    """torch's ``MemTracker`` for a trainable adapter on a frozen base.

    The stock tracker registers a gradient hook on every parameter of each module it enters, which autograd refuses
    for parameters that do not require gradients (all of a frozen base). This one hooks the trainable ones only, so
    gradients are still counted where they exist. It keeps the device peak only: the stock tracker also keeps every
    module's own peak by scanning all modules at every operator, quadratic in the model's size (12 minutes for one
    9B training step here); the audit's phases need the device peak and its categories.
    """

    def _pre_fw_hook(self, module: torch.nn.Module, inputs) -> None:
        # A model called again from the top (the validation pass's forwards, a sampler's steps) is a new iteration
        # to the stock tracker, which refuses it; module statistics are not what the audit reads, so start afresh.
        parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
        if module in self.memory_tracking and not self._mod_tracker.is_bw and parents == {"Global"}:
            self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                self._peak_mem[device] = snapshot[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snapshot)

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True):
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._count_gradient),
                        param.register_post_accumulate_grad_hook(lambda p: self._count_gradient(p.grad)),
                    )
        return memory

    def _count_gradient(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)


CATEGORIES = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer state",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "other",
}


def peak_by_category(tracker: MemTracker, device: str = STAND_IN_DEVICE) -> tuple[float, dict[str, float]]:
    """The stand-in device's peak (GiB) and the categories at that peak, named for people."""
    for dev, categories in tracker.get_tracker_snapshot("peak").items():
        if torch.device(dev).type == torch.device(device).type:
            named = {CATEGORIES[k]: v / GIB for k, v in categories.items() if k in CATEGORIES}
            return categories[_TOTAL_KEY] / GIB, named
    return 0.0, {}
