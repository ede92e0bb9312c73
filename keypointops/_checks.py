"""Argument checks shared by the ops, the layers and the models."""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["check_choice"]


def check_choice(owner: str, name: str, value, choices: Iterable) -> None:
    """Raises ``ValueError("<owner>: <name> must be one of (...), got <value>")`` unless ``value`` is in ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")
