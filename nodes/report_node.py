"""KleinTrainingReport: the run's health chart and verdict (collapse, advice, best checkpoint) as an image."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image

from .types import KleinLoraRun


class KleinTrainingReport(io.ComfyNode):
    """Shows whether the run collapsed, what to do about it, and which checkpoint to keep."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinTrainingReport",
            display_name="Klein Training Report",
            category="Klein LoRA/Health",
            description=(
                "The training-health chart (smoothed training loss, fixed-noise validation loss, likeness per "
                "checkpoint, collapse marker, best checkpoint) and the text verdict. On a collapse it lists the "
                "fixes in order: lower the LR, lower the rank, add a small regularization set, keep the last good "
                "checkpoint."
            ),
            inputs=[KleinLoraRun.Input("run", tooltip="The Klein LoRA Trainer's run.")],
            outputs=[
                io.Image.Output("report", tooltip="The health chart (also saved as report.png in the run folder)."),
                io.String.Output(
                    "verdict", tooltip="Healthy or collapsed, the ordered advice, and the best checkpoint."
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, run) -> io.NodeOutput:
        health = run.health
        if health is None or health.report_path is None:
            raise ValueError("this run has no health report (it was trained on a non-main process or did not finish)")
        image = Image.open(health.report_path).convert("RGB")
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
        return io.NodeOutput(
            tensor, health.verdict, ui={**ui.PreviewImage(tensor, cls=cls).as_dict(), "text": (health.verdict,)}
        )
