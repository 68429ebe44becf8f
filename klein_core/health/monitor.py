"""Live health of a training run: fixed-noise validation loss, preview statistics and likeness per checkpoint,
collapse detection, the best checkpoint, the report chart. The trainer feeds it; ``health`` decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..atomic import atomic_write_bytes
from ..preset import PRESET
from .advice import BestChoice, collapse_advice, pick_best_checkpoint
from .collapse import CollapseReport, detect_collapse
from .history import TrainingHistory
from .likeness import LikenessBackend, choose_backend
from .report import render_training_report, save_training_report, verdict_text
from .stats import preview_statistics

REPORT_FILE = "report.png"


@dataclass
class HealthSummary:
    collapse: CollapseReport | None
    advice: list[str]
    best: BestChoice | None
    best_lora: Path | None
    verdict: str
    report_path: Path | None

    def as_dict(self) -> dict:
        return {
            "collapse": None
            if self.collapse is None
            else {
                **self.collapse.as_dict(),
                "step": self.collapse.began_step,
                "last_good_checkpoint": self.collapse.last_good_path,
                "advice": self.advice,
            },
            "best_checkpoint": None if self.best is None else {**self.best.as_dict(), "file": str(self.best_lora)},
            "verdict": self.verdict,
            "report": str(self.report_path) if self.report_path else None,
        }


@dataclass
class HealthMonitor:
    """Watches one run. ``preview`` renders the health preview of the current adapter (or None to skip)."""

    learning_rate: float
    rank: int
    has_regularization: bool = False
    preview: Callable[[], torch.Tensor] | None = None
    references: list | None = None  # training images (H,W,3 float) for likeness
    history: TrainingHistory = field(default_factory=TrainingHistory)
    backend: LikenessBackend | None = None
    collapse: CollapseReport | None = None

    def record_losses(self, first_step: int, values: Sequence[float]) -> None:
        for offset, value in enumerate(values):
            self.history.add_training_loss(first_step + offset, value)

    def record_checkpoint(
        self,
        step: int,
        lora_path: str | None,
        val_loss: float | None,
        held_out_loss: float | None = None,
        with_preview: bool = True,
    ) -> None:
        """Record a checkpoint's losses and, when ``with_preview`` (and a preview is set up), its health preview's
        statistics and likeness."""
        stats = likeness = None
        if self.preview is not None and with_preview:
            images = self.preview()
            stats = preview_statistics(images)
            if self.references:
                if self.backend is None:
                    self.backend = choose_backend(self.references)
                    self.history.likeness_backend = self.backend.label
                likeness = self.backend.score(images, self.references)
        self.history.add_checkpoint(step, lora_path, val_loss, stats, likeness, held_out_loss)

    def check(self) -> CollapseReport | None:
        """Run every collapse signal over the history so far; remembers the first report."""
        if self.collapse is None:
            self.collapse = detect_collapse(self.history)
        return self.collapse

    def advice(self) -> list[str]:
        if self.collapse is None:
            return []
        return collapse_advice(
            self.collapse, self.learning_rate, self.rank, self.has_regularization, PRESET.regularization_weight
        )

    def finish(self, run_dir: Path, output_name: str) -> HealthSummary:
        """Pick the best checkpoint (copied to ``<name>_best.safetensors``), draw the report, write the verdict.

        The detector runs once more over the whole history, so the verdict lists every signal that fired by the end
        (a run stopped by a NaN after its previews blew out shows both)."""
        self.collapse = detect_collapse(self.history)
        best = pick_best_checkpoint(self.history, self.collapse)
        best_lora = None
        if best is not None:
            best_lora = run_dir / f"{output_name}_best.safetensors"
            atomic_write_bytes(best_lora, Path(best.path).read_bytes())
        advice = self.advice()
        verdict = verdict_text(self.history, self.collapse, best, advice, best_lora)
        report_path = save_training_report(
            render_training_report(self.history, self.collapse, best), run_dir / REPORT_FILE
        )
        return HealthSummary(self.collapse, advice, best, best_lora, verdict, report_path)
