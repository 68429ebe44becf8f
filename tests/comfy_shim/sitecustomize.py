"""Test-server-only shim (on the PYTHONPATH of the ComfyUI test server, nowhere else).

PyPI's torchvision is a CUDA build; beside CPU torch its compiled extension cannot load, and importing it then
fails with "operator torchvision::nms does not exist" (it registers fake kernels for those two ops at import).
tests/setup_comfyui.sh deletes the extension; this finder declares the two op schemas just before torchvision is
first imported, so the import succeeds. The ops get no kernels: calling them raises, and the pack needs none.

Lazy on purpose: importing torch here, at interpreter start, would trigger ComfyUI's "torch already imported"
warning.
"""

import importlib.abc
import sys

_OPS_WITHOUT_KERNELS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_KEEP_ALIVE = []  # a torch.library.Library must stay referenced or its definitions are dropped


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        library = torch.library.Library("torchvision", "DEF")
        for schema in _OPS_WITHOUT_KERNELS:
            library.define(schema)
        _KEEP_ALIVE.append(library)
        return None  # let the normal finders import torchvision itself


sys.meta_path.insert(0, _DeclareTorchvisionOps())
