"""Gold answers of any JSON type, turned into the LaTeX strings the verifier compares.

Datasets disagree on types: MATH500 stores LaTeX strings, AIME strings of digits, AMC floats
(``27.0``). Integral floats become integers so that ``27.0`` matches a response ``27``; a list
means "any of these answers is correct".
"""
from __future__ import annotations

import math
from typing import Any

from gvm_mega.reward.extract import last_boxed


def _one(gold: Any, where: str) -> str:
    if isinstance(gold, bool) or gold is None:
        raise ValueError(f"{where}: a gold answer must be a number, a string or a list of them, "
                         f"got {gold!r}")
    if isinstance(gold, int):
        return str(gold)
    if isinstance(gold, float):
        if math.isfinite(gold) and gold.is_integer():
            return str(int(gold))
        return repr(gold)
    if isinstance(gold, str):
        text = gold.strip()
        boxed = last_boxed(text) if ("\\boxed" in text or "\\fbox" in text) else None
        if boxed is not None:
            text = boxed
        elif len(text) >= 2 and text.startswith("$") and text.endswith("$"):
            text = text.strip("$").strip()
        if not text:
            raise ValueError(f"{where}: the gold answer is empty")
        return text
    raise ValueError(f"{where}: a gold answer must be a number, a string or a list of them, "
                     f"got {type(gold).__name__}")


def normalize_gold(gold: Any, *, where: str = "gold") -> tuple[str, ...]:
    """The accepted answers for one gold value, as LaTeX strings without delimiters."""
    if isinstance(gold, (list, tuple)):
        if not gold:
            raise ValueError(f"{where}: the list of gold answers is empty")
        return tuple(_one(g, f"{where}[{i}]") for i, g in enumerate(gold))
    return (_one(gold, where),)
