"""The pack's ComfyUI nodes, as one explicit list.

When a node module lands, add its import and its class to NODE_CLASSES; nothing here is discovered by magic,
so a missing or broken module fails loudly at import (ComfyUI then logs the traceback and "IMPORT FAILED").
"""

from .calculator_node import KleinRepeatsCalculator
from .dataset_node import KleinCaptionDataset
from .preview_node import KleinBasePreviewSampler
from .report_node import KleinTrainingReport
from .trainer_node import KleinLoRATrainer

NODE_CLASSES = [
    KleinRepeatsCalculator,
    KleinCaptionDataset,
    KleinLoRATrainer,
    KleinBasePreviewSampler,
    KleinTrainingReport,
]
