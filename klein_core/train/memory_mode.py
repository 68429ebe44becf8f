"""Which memory mode a run uses on a given card: the fastest that fits, and the lines the trainer logs about it.

The estimate (``train.estimate``) says what a mode costs; this module chooses among modes: no checkpointing, the
fewest checkpointed blocks, every block, and the 8-bit base.
"""

from dataclasses import dataclass
from typing import NamedTuple

from .estimate import MODES_BY_PREFERENCE, Estimate, Mode, ModelShape, estimate, fits, model_shape


@dataclass(frozen=True)
class Recommendation:
    """The mode to use on a given GPU, and what to tell the user about the requested one."""

    requested: Estimate
    mode: Mode | None  # the fastest mode that fits; None when nothing fits
    fitting: Estimate | None
    gpu_memory_gib: float

    @property
    def requested_fits(self) -> bool:
        return fits(self.requested, self.gpu_memory_gib)

    @property
    def warning(self) -> str | None:
        """None when the requested mode fits; else a sentence naming the mode (and options) that would."""
        if self.requested_fits:
            return None
        have = f"{self.requested.memory.peak:.1f} GiB estimated"
        card = f"your {self.gpu_memory_gib:.0f} GiB GPU"
        if self.mode is None:
            return (
                f"will not fit {card} in any mode ({have} as requested); train at a lower resolution "
                f"(e.g. {max(512, self.requested.resolution // 2)}), a smaller rank or the 4B"
            )
        missing = [
            what
            for what, needed, have_it in (
                (
                    "gradient checkpointing",
                    self.mode.gradient_checkpointing,
                    self.requested.mode.gradient_checkpointing,
                ),
                ("an 8-bit base", self.mode.base_8bit, self.requested.mode.base_8bit),
            )
            if needed and not have_it
        ]
        return (
            f"will not fit {card} without {' and '.join(missing)} ({have}, "
            f"{self.fitting.memory.peak:.1f} GiB with it); use {self.mode.flags}"
        )


def recommend_mode(
    variant: "str | ModelShape | dict",
    resolution: int,
    rank: int,
    gpu_memory_gib: float,
    requested: Mode | None = None,
    **estimate_kwargs,
) -> Recommendation:
    """The fastest mode that fits ``gpu_memory_gib``, never dropping what ``requested`` (default: the fastest mode,
    no checkpointing) already turned on."""
    requested = Mode() if requested is None else requested
    asked = estimate(variant, resolution, rank, requested, **estimate_kwargs)
    for mode in MODES_BY_PREFERENCE:
        if (requested.gradient_checkpointing and not mode.gradient_checkpointing) or (
            requested.base_8bit and not mode.base_8bit
        ):
            continue
        candidate = asked if mode == requested else estimate(variant, resolution, rank, mode, **estimate_kwargs)
        if fits(candidate, gpu_memory_gib):
            return Recommendation(asked, mode, candidate, gpu_memory_gib)
    return Recommendation(asked, None, None, gpu_memory_gib)


def fewest_checkpointed_blocks(
    variant: "str | ModelShape | dict",
    resolution: int,
    rank: int,
    gpu_memory_gib: float,
    base_8bit: bool = False,
    **estimate_kwargs,
) -> int | None:
    """The fewest blocks to checkpoint for the training step to fit (every block not checkpointed saves a block's
    recompute, ~1/n of a forward per training step); None when even checkpointing every block does not fit."""
    blocks = model_shape(variant).blocks
    for count in range(1, blocks + 1):
        mode = Mode(True, base_8bit, count)
        if fits(estimate(variant, resolution, rank, mode, **estimate_kwargs), gpu_memory_gib):
            return count
    return None


class MemoryDecision(NamedTuple):
    """The mode a run trains in, the lines to log before step 1, and that mode's estimate (what the last line says;
    the trainer reads its checkpoint work from it)."""

    mode: Mode
    lines: list[str]
    estimate: Estimate


def decide_memory_mode(
    variant: "str | ModelShape | dict",
    resolution: int,
    rank: int,
    gradient_checkpointing: bool | None,
    base_8bit: bool = False,
    gpu_memory_gib: float | None = None,
    **estimate_kwargs,
) -> MemoryDecision:
    """The trainer's pre-flight: what to checkpoint, and the lines to log before step 1.

    ``gradient_checkpointing=None`` means automatic: with a known GPU size, no checkpointing when the run fits
    without, else the fewest blocks that make it fit (all of them when nothing smaller does); the 8-bit base always
    checkpoints (every block). An explicit True (every block) or False is kept; if the run will not fit, a warning
    names the mode that would.
    """
    mode = Mode(bool(gradient_checkpointing) or (base_8bit and gradient_checkpointing is None), base_8bit)
    lines = []
    if base_8bit and gradient_checkpointing is None:
        lines.append("gradient checkpointing: on (automatic: the 8-bit base needs it)")
    if gpu_memory_gib is not None:
        advice = recommend_mode(variant, resolution, rank, gpu_memory_gib, mode, **estimate_kwargs)
        if gradient_checkpointing is None and not base_8bit and not advice.requested_fits:
            count = fewest_checkpointed_blocks(variant, resolution, rank, gpu_memory_gib, **estimate_kwargs)
            blocks = model_shape(variant).blocks
            mode = Mode(True, False, count if count is not None and count < blocks else None)
            shown = f"{count} of {blocks} blocks" if mode.checkpointed_blocks is not None else "every block"
            lines.append(f"gradient checkpointing: {shown} (automatic: the run {advice.warning})")
            advice = recommend_mode(variant, resolution, rank, gpu_memory_gib, mode, **estimate_kwargs)
        if advice.warning:
            lines.append(f"warning: this run {advice.warning}")
    chosen = estimate(variant, resolution, rank, mode, **estimate_kwargs)
    lines.append(chosen.summary())
    return MemoryDecision(mode, lines, chosen)
