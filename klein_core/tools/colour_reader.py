"""The part-colour reader: a small CNN that says which of the world's colours a drawn character's hat, scarf and body
are. It is how the pre-trained tiny Klein's samples are scored (colour accuracy) and how the demo labels its
part-colour likeness: a face embedder sees no face in a drawing, the reader sees the parts.

It is trained on the world's own pictures (labels are free: the renderer knows the look), deterministically from a
seed, and ships beside the tiny Klein as ``reader.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .world import COLOUR_NAMES, PARTS, Look

READER_SIZE = 64  # pictures are read at 64 x 64 (resized if needed)


class PartColourReader(nn.Module):
    """64x64 RGB in [0, 1] -> logits (B, 3 parts, 8 colours). Four stride-2 convs keep the layout (hat above scarf
    above body) in a 4x4 map, which a linear layer reads."""

    def __init__(self) -> None:
        super().__init__()
        widths = (3, 16, 32, 48, 64)
        layers: list[nn.Module] = []
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64 * 4 * 4, len(PARTS) * len(COLOUR_NAMES))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != READER_SIZE or pixels.shape[-2] != READER_SIZE:
            pixels = nn.functional.interpolate(
                pixels, size=(READER_SIZE, READER_SIZE), mode="bilinear", antialias=True, align_corners=False
            )
        features = self.features(pixels * 2 - 1).flatten(1)
        return self.head(features).view(-1, len(PARTS), len(COLOUR_NAMES))


def look_labels(looks: Sequence[Look]) -> torch.Tensor:
    """(N, 3) colour indices of each look's hat, scarf and body."""
    return torch.tensor([[COLOUR_NAMES.index(c) for c in look.colours] for look in looks])


def train_reader(
    pixels: torch.Tensor, labels: torch.Tensor, seed: int, training_steps: int, batch_size: int = 64
) -> PartColourReader:
    """Fit a reader on pictures (N, 3, 64, 64) in [0, 1] with their (N, 3) colour labels; deterministic from seed."""
    torch.manual_seed(seed)
    reader = PartColourReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=training_steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(training_steps):
        batch = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        logits = reader(pixels[batch])
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(COLOUR_NAMES)), labels[batch].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return reader.eval()


@torch.no_grad()
def read_colours(reader: PartColourReader, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) pictures in [0, 1] -> (N, 3) colour indices of hat, scarf and body."""
    return torch.cat([reader(chunk.float()).argmax(-1) for chunk in pixels.split(256)])


def part_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``all_parts``: share of pictures with all three colours right; ``parts``: share of parts right."""
    right = predicted == labels
    return {"all_parts": float(right.all(dim=1).float().mean()), "parts": float(right.float().mean())}


def save_reader(reader: PartColourReader, path: Path) -> Path:
    from ..atomic import atomic_save_safetensors

    return atomic_save_safetensors({k: v.half().contiguous() for k, v in reader.state_dict().items()}, path)


def load_reader(path: str | Path) -> PartColourReader:
    from safetensors.torch import load_file

    reader = PartColourReader()
    reader.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return reader.eval()


def part_colour_score(reader: PartColourReader, pixels: torch.Tensor, look: Look) -> float:
    """Share of ``look``'s three part colours the reader finds in the pictures, averaged over them (0 to 1).

    A likeness for drawn characters, labelled as such wherever it is shown: it checks the parts' colours, not the
    mark or the pose."""
    wanted = look_labels([look]).expand(len(pixels), -1)
    return float((read_colours(reader, pixels) == wanted).float().mean())
