"""Strict dict <-> dataclass conversion for configurations stored in tuning files.

An unknown key in a stored configuration is an error naming the valid keys, never a
silently dropped field (a table written by a newer moecc must not half-apply).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def strict_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"unknown {what} key(s) {sorted(unknown)}; valid: {sorted(fields)}")
    return cls(**d)
