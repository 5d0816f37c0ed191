"""Field declarations with constraints, so the schema states its own valid ranges.

Every config field is a dataclass field built with :func:`option`; the loader reads the
constraints back from the field metadata to validate values and to word error messages.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field: default, one-line help, and optional numeric bounds or choices."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "choices": tuple(choices) if choices is not None else None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def describe_bounds(meta: dict) -> str:
    """Human wording of a field's bounds, e.g. '>= 0 and < 1'."""
    parts = []
    for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{sym} {meta[key]}")
    if meta.get("choices"):
        parts.append("one of " + ", ".join(repr(c) for c in meta["choices"]))
    return " and ".join(parts)


def check_bounds(value: Any, meta: dict) -> bool:
    """True when ``value`` satisfies the field's bounds and choices (None always passes)."""
    if value is None:
        return True
    if meta.get("choices") and value not in meta["choices"]:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("ge") is not None and not value >= meta["ge"]:
            return False
        if meta.get("gt") is not None and not value > meta["gt"]:
            return False
        if meta.get("le") is not None and not value <= meta["le"]:
            return False
        if meta.get("lt") is not None and not value < meta["lt"]:
            return False
    return True
