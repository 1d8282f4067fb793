"""A dataclass saved as a JSON object: ``to_dict``, and ``from_dict`` that refuses a key it does not know,
naming it, so a misspelt or stale field in a saved file is an error, not a silently ignored value."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["DictRecord"]

R = TypeVar("R", bound="DictRecord")


class DictRecord:
    KIND = "config"  # what the error message calls it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.KIND} keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)
