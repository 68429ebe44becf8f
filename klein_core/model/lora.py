"""Klein LoRA: targets, the peft adapter, the file we write, the files we read, and exact merge/restore.

The file we write uses diffusers/peft names under ``transformer.`` with alpha/rank folded into ``lora_B`` and no
``.alpha`` keys: ComfyUI (since its Flux2 key map, early 2026) loads it with every key, and diffusers'
``Flux2KleinPipeline.load_lora_weights`` accepts it (it rejects alpha keys). Both then apply the same delta.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer, LoraVariant

from ..atomic import atomic_save_safetensors
from ..errors import LoraFormatError
from .keymap import _DOUBLE_BLOCK, _DOUBLE_QKV, _SINGLE_BLOCK
from .single_block_lora import adapter_matrices, use_parts_processor

# The complete attention set of every block: image and text streams of the double blocks (q/k/v/out each), and the
# fused qkv+mlp-in and output projection of the single blocks. Double-block ``to_out`` is a ModuleList, hence ``.0``.
LORA_TARGETS = (
    r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|.*single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
)
FILE_PREFIX = "transformer."
LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r), alpha folded)


def expected_target_count(num_layers: int, num_single_layers: int) -> int:
    return 8 * num_layers + 2 * num_single_layers


def target_module_names(transformer) -> list[str]:
    pattern = re.compile(LORA_TARGETS)
    return [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
    ]


class BaseDtypeLora(LoraVariant):
    """The LoRA computed in the base layer's dtype, added inside the second matmul.

    peft's plain LoRA casts each layer's input to the adapter's fp32 and adds ``lora_B(lora_A(x)) * scaling`` to the
    base output element-wise: on a bf16 base that is an fp32 copy of every adapted input (three of the same input for
    q, k and v), kept for the backward, and two output-sized element-wise passes per layer. Here the fp32 master
    weights (which AdamW updates) are cast to the input's dtype, ``x @ Aᵀ`` is one matmul and the base output is
    accumulated by ``addmm``; the fit-check audit counts a 9B training step's element-wise traffic and saved
    activations within a few percent of the frozen model's. Autocast would get the dtype but also run norms and
    softmax in fp32 around the base. On an fp32 base (the CPU) the math is the plain LoRA's.
    """

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:
        module.cast_input_dtype_enabled = False  # the input keeps the base's dtype; the weights are cast instead

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        down, up = adapter_matrices(module, active_adapter, x.dtype)
        hidden = module.lora_dropout[active_adapter](x).flatten(0, -2) @ down.T
        return torch.addmm(result.flatten(0, -2), hidden, up.T).view_as(result)


def add_lora(transformer, rank: int, alpha: float | None = None, adapter_name: str = "default"):
    """Inject a fresh peft LoRA (fp32 parameters, B = 0 so it starts as a no-op) into ``transformer``, computed in
    the base's dtype (:class:`BaseDtypeLora`); the single blocks' output projection reads its input's parts
    (:mod:`.single_block_lora`)."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=LORA_TARGETS, init_lora_weights=True
    )
    with warnings.catch_warnings():
        # peft warns that its torchao LoRA layer (8-bit base) cannot merge; previews patch or hook instead of merging
        # through peft. Scoped here so ComfyUI's process keeps its own warning filters.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        inject_adapter_in_model(config, transformer, adapter_name=adapter_name)
    for module in transformer.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            module.lora_variant[adapter_name] = BaseDtypeLora()
            BaseDtypeLora.init(module, adapter_name)
    for name, param in transformer.named_parameters():
        is_lora = "lora_" in name
        param.requires_grad_(is_lora)
        if is_lora:
            param.data = param.data.float()
    use_parts_processor(transformer, attached=True)
    return transformer


def remove_lora(transformer) -> None:
    """Swap every injected LoRA layer back for its untouched base Linear (previews then merge checkpoints)."""
    for name, module in list(transformer.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, module.get_base_layer())
    transformer.__dict__.pop("peft_config", None)  # peft's record of the adapter: a later add_lora starts clean
    use_parts_processor(transformer, attached=False)


def lora_layers(transformer) -> list[LoraLayer]:
    """Every layer an adapter was injected into (walk the model once, not at every training step)."""
    return [module for module in transformer.modules() if isinstance(module, LoraLayer)]


@contextmanager
def adapters_disabled(layers: list[LoraLayer]) -> Iterator[None]:
    """The base model's own predictions while a LoRA stays attached (peft's switch on each of ``layers``)."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if "lora_" in n]


def adapter_weights(transformer, adapter_name: str = "default") -> LoraWeights:
    """The adapter as (A, B·alpha/rank) per module, detached fp32 copies on the CPU."""
    out: LoraWeights = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            a = module.lora_A[adapter_name].weight.detach().float().cpu().clone()
            b = module.lora_B[adapter_name].weight.detach().float().cpu() * module.scaling[adapter_name]
            out[name.removeprefix("base_model.model.")] = (a, b.clone())
    return out


def load_adapter_weights(transformer, weights: LoraWeights, adapter_name: str = "default") -> None:
    """Put saved (A, B·scale) pairs back into an injected adapter (used by resume)."""
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and name in weights:
            a, b = weights[name]
            module.lora_A[adapter_name].weight.data.copy_(a)
            module.lora_B[adapter_name].weight.data.copy_(b / module.scaling[adapter_name])


def save_lora(path: str | Path, weights: LoraWeights, metadata: dict[str, object] | None = None) -> Path:
    """Write our LoRA file atomically: ``transformer.<module>.lora_{A,B}.weight``, alpha folded, no alpha keys."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in sorted(weights.items()):
        tensors[f"{FILE_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{FILE_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    meta = {"format": "klein-lora-trainer", "key_format": "diffusers-peft, alpha folded into lora_B"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    return atomic_save_safetensors(tensors, path, metadata=meta)


# --- reading LoRA files in the supported key formats ------------------------------------------------------------
@dataclass(frozen=True)
class _Pair:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None


def _bfl_module_map() -> dict[str, tuple[str, ...] | str]:
    """Block-local BFL module name -> diffusers name (a tuple for fused qkv that splits in thirds)."""
    table: dict[str, tuple[str, ...] | str] = {}
    table.update({f"double_blocks.{{i}}.{b}": f"transformer_blocks.{{i}}.{d}" for b, d in _DOUBLE_BLOCK})
    table.update(
        {f"double_blocks.{{i}}.{b}": tuple(f"transformer_blocks.{{i}}.{p}" for p in parts) for b, parts in _DOUBLE_QKV}
    )
    table.update({f"single_blocks.{{i}}.{b}": f"single_transformer_blocks.{{i}}.{d}" for b, d in _SINGLE_BLOCK})
    return table


def _bfl_to_diffusers_module(name: str) -> tuple[str, ...] | str | None:
    m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)$", name)
    if not m:
        return None
    kind, index, local = m.groups()
    target = _bfl_module_map().get(f"{kind}.{{i}}.{local}")
    if target is None:
        return None
    return tuple(t.format(i=index) for t in target) if isinstance(target, tuple) else target.format(i=index)


def _kohya_to_bfl(name: str) -> str | None:
    """``double_blocks_3_img_attn_qkv`` -> ``double_blocks.3.img_attn.qkv``."""
    m = re.match(r"(double_blocks|single_blocks)_(\d+)_(.+)$", name)
    if not m:
        return None
    kind, index, local = m.groups()
    for candidate in list(dict(_DOUBLE_BLOCK)) + [q for q, _ in _DOUBLE_QKV] + list(dict(_SINGLE_BLOCK)):
        if candidate.replace(".", "_") == local:
            return f"{kind}.{index}.{candidate}"
    return None


def _group_pairs(state: dict[str, torch.Tensor], path: Path) -> dict[str, _Pair]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.match(r"(.+?)\.(lora_A|lora_B|lora_down|lora_up)\.weight$|(.+?)\.alpha$", key)
        if not m:
            raise LoraFormatError(f"{path}: unrecognised LoRA key {key!r}")
        if m.group(3):
            modules.setdefault(m.group(3), {})["alpha"] = tensor
        else:
            role = "down" if m.group(2) in ("lora_A", "lora_down") else "up"
            modules.setdefault(m.group(1), {})[role] = tensor
    pairs = {}
    for name, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise LoraFormatError(f"{path}: {name} has no matching down/up (A/B) pair")
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        pairs[name] = _Pair(parts["down"].float(), parts["up"].float(), alpha)
    return pairs


def read_lora_file(path: str | Path) -> LoraWeights:
    """Read a Klein LoRA in any supported format into diffusers module names, alpha folded into B.

    Supported: ours / diffusers-peft (``transformer.<diffusers>``), ai-toolkit (``diffusion_model.<BFL>``, fused
    qkv split in thirds) and kohya (``lora_unet_<bfl_underscored>`` with ``lora_down/up`` and ``.alpha``).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"LoRA file not found: {path}")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise LoraFormatError(f"{path} is not a readable safetensors LoRA ({exc})") from exc
    weights: LoraWeights = {}
    for name, pair in _group_pairs(state, path).items():
        rank = pair.down.shape[0]
        up = pair.up * (pair.alpha / rank if pair.alpha is not None else 1.0)
        if name.startswith("lora_unet_"):
            bfl = _kohya_to_bfl(name.removeprefix("lora_unet_"))
            target = _bfl_to_diffusers_module(bfl) if bfl else None
        elif name.startswith("diffusion_model."):
            target = _bfl_to_diffusers_module(name.removeprefix("diffusion_model."))
        else:
            target = name.removeprefix(FILE_PREFIX).removeprefix("base_model.model.")
            if not re.fullmatch(r"(single_)?transformer_blocks\.\d+\..+", target):
                target = None
        if target is None:
            raise LoraFormatError(f"{path}: cannot map LoRA module {name!r} onto a Klein transformer")
        if isinstance(target, tuple):  # fused qkv: shared A, B split in thirds
            for sub, up_part in zip(target, up.chunk(3, dim=0)):
                weights[sub] = (pair.down, up_part.clone())
        else:
            weights[target] = (pair.down, up)
    return weights


# --- merging for previews, with exact restore -------------------------------------------------------------------
class LoraPatcher:
    """Merge LoRA deltas into a plain transformer's Linear weights, and put the exact originals back.

    Merging makes a preview cost the same as the base model (an unmerged LoRA costs 1.2-1.4x per forward). A
    quantised weight (the 8-bit base of the low-VRAM mode) cannot take a dense delta: such a module gets the LoRA as
    a forward hook instead (output + x·Aᵀ·Bᵀ·strength), removed again by ``restore``.
    """

    def __init__(self, transformer, backup_device="cpu"):
        """``backup_device`` holds the originals while merged: host memory (the fit-check audit passes a device its
        tracker reports apart from the GPU's stand-in)."""
        self.transformer = transformer
        self.backup_device = backup_device
        self.modules = dict(transformer.named_modules())
        self.originals: dict[str, torch.Tensor] = {}
        self.hooks: list = []

    def apply(self, weights: LoraWeights, strength: float = 1.0) -> None:
        """Merge in place, each original backed up to the CPU first: the model's device holds one copy of every
        weight throughout (a merged copy next to the original cost +11.75 GiB on the 9B)."""
        self.restore()
        for name, (a, b) in weights.items():
            module = self.modules.get(name)
            if module is None or not isinstance(module, torch.nn.Linear):
                raise LoraFormatError(f"LoRA module {name} does not exist in this transformer (wrong Klein size?)")
            weight = module.weight
            if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                raise LoraFormatError(
                    f"LoRA module {name} has shape {(b.shape[0], a.shape[1])}, the model {tuple(weight.shape)}"
                )
            if type(weight.data) is not torch.Tensor:  # a quantised tensor subclass: patch the output instead
                self.hooks.append(module.register_forward_hook(_lora_output_hook(a, b, strength, weight.device)))
                continue
            self.originals[name] = _offload_copy(
                weight.data, self.backup_device
            )  # before the merge: a failure mid-way still restores
            _merge_in_place(weight.data, a, b, strength)

    def restore(self) -> None:
        for name, original in self.originals.items():
            self.modules[name].weight.data.copy_(original)  # the exact bits back, into the same storage
        self.originals = {}
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    @contextmanager
    def applied(self, weights: LoraWeights | None, strength: float = 1.0) -> Iterator["LoraPatcher"]:
        """Merge for the duration of a ``with`` block (no LoRA when ``weights`` is empty), then restore."""
        try:
            if weights:
                self.apply(weights, strength)
            yield self
        finally:
            self.restore()


def _lora_output_hook(a: torch.Tensor, b: torch.Tensor, strength: float, device):
    a, b = a.to(device, torch.float32), (b * strength).to(device, torch.float32)

    def hook(_module, args, output):
        return output + (args[0].float() @ a.T @ b.T).to(output.dtype)

    return hook


# Rows merged per step: the fp32 delta in flight is MERGE_ROWS x in_features (64 MiB at Klein 9B's 4096 inputs)
# rather than the whole weight (the single blocks' fused projection is 36864 x 4096, 576 MiB in fp32).
MERGE_ROWS = 4096


def _offload_copy(weight: torch.Tensor, device="cpu") -> torch.Tensor:
    """A host copy of ``weight``, in pinned memory for a CUDA weight (fast copies back, as ComfyUI's ModelPatcher)."""
    pin = weight.device.type == "cuda" and torch.device(device).type == "cpu" and torch.cuda.is_available()
    backup = torch.empty(weight.shape, dtype=weight.dtype, device=device, pin_memory=pin)
    return backup.copy_(weight)


def _merge_in_place(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, strength: float) -> None:
    """weight += strength·B·A, a chunk of rows at a time; the sum is taken in fp32 and rounded once to the weight's
    dtype (what ``(w.float() + delta).to(dtype)`` gives, without an fp32 copy of the whole weight)."""
    a = a.to(weight.device, torch.float32)
    b = b.to(weight.device, torch.float32)
    for start in range(0, weight.shape[0], MERGE_ROWS):
        rows = weight[start : start + MERGE_ROWS]
        rows.add_((b[start : start + MERGE_ROWS] @ a) * strength)
