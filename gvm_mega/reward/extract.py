"""Pull the final answer out of a model response.

The answer is the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), read with a brace
matcher so nested braces and escaped braces (``\\{``) work. A response whose last box is never
closed (a truncated generation) has no answer: an earlier box is stale by then. When no box is
present an optional fallback applies; with none, the response has no answer and scores 0.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

Fallback = Literal["none", "last-number"]
FALLBACKS: tuple[str, ...] = ("none", "last-number")

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_SPACE_FORM = re.compile(r"\s+([^\s$]+)")


def _braced(text: str, start: int) -> Optional[str]:
    """Content of the brace group opening at ``text[start] == '{'``; None when never closed."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (\{, \}, \\) never changes the depth
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed``/``\\fbox`` in ``text``, or None.

    Accepts ``\\boxed{...}``, ``\\boxed {...}`` and the brace-less ``\\boxed 42``.
    """
    last = None
    for last in _BOX_COMMAND.finditer(text):
        pass
    if last is None:
        return None
    rest = last.end()
    j = rest
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        content = _braced(text, j)
    else:
        m = _SPACE_FORM.match(text, rest)
        content = m.group(1) if m and m.start(1) > rest else None
    if content is None:
        return None
    content = content.strip()
    return content or None


def last_number(text: str) -> Optional[str]:
    """The last number written in ``text`` (thousands separators dropped), or None."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return last.group(0).replace(",", "") if last else None


def extract_answer(text: str, *, fallback: Fallback = "none",
                   max_chars: Optional[int] = 1000) -> Optional[str]:
    """The final answer of a response, or None when it has none.

    ``max_chars`` bounds the answer's length: real final answers are short, and a huge one is
    not worth a verifier's time (None disables the bound).
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown answer fallback {fallback!r}; expected one of {FALLBACKS}")
    if not isinstance(text, str):
        raise TypeError(f"a response must be a str, got {type(text).__name__}")
    answer = last_boxed(text)
    if answer is None and fallback == "last-number":
        answer = last_number(text)
    if answer is not None and max_chars is not None and len(answer) > max_chars:
        return None
    return answer
