"""Read per-prompt statistics from JSONL, with errors that name the line and the problem.

One object per line: ``{"prompt_id", "num_samples", "num_accepted", "grad_norm"}``.
``prompt_id`` is a string or an integer; the counts are JSON integers with
``1 <= num_samples`` and ``0 <= num_accepted <= num_samples``; ``grad_norm`` is a finite
non-negative number, or null when ``num_accepted`` is 0 (no accepted response, no norm).
Other keys are ignored; blank lines are skipped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED = ("prompt_id", "num_samples", "num_accepted", "grad_norm")


class StatsFileError(ValueError):
    """A malformed statistics file; the message starts with ``path:line:``."""


@dataclass(frozen=True)
class StatsTable:
    prompt_ids: list[str]
    num_samples: np.ndarray    # int64
    num_accepted: np.ndarray   # int64
    grad_norms: np.ndarray     # float64; NaN where the file had null

    def __len__(self) -> int:
        return len(self.prompt_ids)


def read_stats_jsonl(path: str | Path) -> StatsTable:
    """Parse and validate the whole file; raise :class:`StatsFileError` on the first bad row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StatsFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise StatsFileError(f"{path}: not UTF-8 text ({exc.reason})") from None
    ids: list[str] = []
    first_line: dict[str, int] = {}
    samples, accepted, norms = [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue

        def fail(problem: str) -> StatsFileError:
            return StatsFileError(f"{path}:{lineno}: {problem}")

        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise fail(f"broken JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(row, dict):
            raise fail(f"expected a JSON object, got {type(row).__name__}")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise fail(f"missing field {', '.join(repr(k) for k in missing)}")
        pid = row["prompt_id"]
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise fail(f"prompt_id must be a string or an integer, got {pid!r}")
        pid = str(pid)
        if pid in first_line:
            raise fail(f"duplicate prompt_id {pid!r} (first seen on line {first_line[pid]})")
        n = _count(row, "num_samples", fail)
        a = _count(row, "num_accepted", fail)
        if n < 1:
            raise fail(f"num_samples must be at least 1, got {n}")
        if a > n:
            raise fail(f"num_accepted ({a}) exceeds num_samples ({n})")
        g = row["grad_norm"]
        if g is None:
            if a > 0:
                raise fail("grad_norm is null but num_accepted > 0")
            g = math.nan
        elif isinstance(g, bool) or not isinstance(g, (int, float)):
            raise fail(f"grad_norm must be a number, got {g!r}")
        elif not math.isfinite(g):
            raise fail(f"grad_norm must be finite, got {g}")
        elif g < 0:
            raise fail(f"grad_norm must be non-negative, got {g}")
        first_line[pid] = lineno
        ids.append(pid)
        samples.append(n)
        accepted.append(a)
        norms.append(float(g))
    if not ids:
        raise StatsFileError(f"{path}: no statistics rows")
    return StatsTable(ids, np.array(samples, dtype=np.int64), np.array(accepted, dtype=np.int64),
                      np.array(norms, dtype=np.float64))


def _count(row: dict, key: str, fail) -> int:
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(f"{key} must be an integer, got {value!r}")
    if value < 0:
        raise fail(f"{key} must be non-negative, got {value}")
    return value
