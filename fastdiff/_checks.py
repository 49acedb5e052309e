"""Argument checks shared by fastdiff's modules and models: the error names the argument, the
value and what is accepted."""

from __future__ import annotations


def positive_int(name: str, value: object, owner: str | None = None) -> int:
    """``value`` if it is an int >= 1 (a bool is not), else ValueError "[owner: ]name must be a
    positive int, got value"."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        where = f"{owner}: " if owner else ""
        raise ValueError(f"{where}{name} must be a positive int, got {value!r}")
    return value
