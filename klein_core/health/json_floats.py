"""Floats in run.json: the file must stay strict JSON (the browser's JSON.parse rejects NaN), so non-finite floats
are written as the strings "nan", "inf" and "-inf"."""

from __future__ import annotations

import math
from typing import Any


def float_to_json(value: float | None) -> float | str | None:
    """A float for run.json: NaN and infinities as the strings float() reads back."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def float_from_json(value: Any) -> float | None:
    """The float ``float_to_json`` wrote (None stays None)."""
    if value is None:
        return None
    return float(value)  # float("nan"), float("inf") and float("-inf") parse the strings written above


def is_finite(value: float | None) -> bool:
    """A reading that is present and neither NaN nor infinite."""
    return value is not None and math.isfinite(value)
