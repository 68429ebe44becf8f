"""Building a settings dataclass from an object that names its values like the dataclass's fields."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_attributes(cls: type[T], source: object, **overrides: Any) -> T:
    """``cls`` with each field taken from ``source``'s attribute of the same name, ``overrides`` winning.

    Where the names agree (an argparse namespace whose dests are named like the config's fields, a progress reporter
    whose methods are the callbacks) a value reaches its field by name, so a new setting is one more field and one
    more flag rather than one more line of ``x=args.x`` in every caller. A field ``source`` lacks keeps its default;
    a value named alike that means something else belongs in ``overrides``.
    """
    values = {f.name: getattr(source, f.name) for f in fields(cls) if f.init and hasattr(source, f.name)}
    return cls(**{**values, **overrides})
