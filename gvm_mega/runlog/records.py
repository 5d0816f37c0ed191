"""Per-iteration JSONL files of a run: ``metrics.jsonl`` and ``allocations.jsonl``.

Each line is one JSON object with an integer ``iteration``; iterations strictly increase down
the file. Appends are flushed and fsynced, so a SIGKILL loses at most the line being written.
On resume the file is cut back to the records at or before the checkpointed iteration (a
torn last line is dropped), so a resumed run's file reads as if it had never stopped.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence


class RunLogError(ValueError):
    """A run directory or one of its files that cannot be used, worded for the user."""


def _scalar(key: str, value: Any) -> Any:
    """A JSON-safe scalar: non-finite floats become None; tensors/numpy scalars are unwrapped."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r}: expected a number, string, bool or None, "
                    f"got {type(value).__name__}")


def clean_record(record: Mapping[str, Any]) -> dict:
    """``record`` with every value a finite number, a string, a bool or None."""
    out = {}
    for key, value in record.items():
        if not isinstance(key, str):
            raise TypeError(f"metric keys must be strings, got {key!r}")
        out[key] = _scalar(key, value)
    return out


def _check_iteration(record: Mapping[str, Any], where: str) -> int:
    it = record.get("iteration")
    if isinstance(it, bool) or not isinstance(it, int) or it < 0:
        raise RunLogError(f"{where}: 'iteration' must be an integer >= 0, got {it!r}")
    return it


def iter_records(path: str | Path, *, allow_torn_tail: bool = False
                 ) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of a run's JSONL file.

    Raises :class:`RunLogError` naming file and line for a line that is not a JSON object
    with a valid, increasing ``iteration``. With ``allow_torn_tail`` an unparsable last line
    that lacks its newline (a write cut short by a kill) is skipped instead.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RunLogError(f"{path}: no such file") from None
    lines = data.split(b"\n")
    last = -1
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        torn = lineno == len(lines) and not data.endswith(b"\n")
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if torn and allow_torn_tail:
                return
            raise RunLogError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise RunLogError(f"{where}: expected a JSON object, got {type(record).__name__}")
        it = _check_iteration(record, where)
        if it <= last:
            raise RunLogError(f"{where}: iteration {it} does not follow iteration {last}")
        last = it
        yield lineno, record


def read_records(path: str | Path) -> list[dict]:
    """Every record of a run's JSONL file (strict: any broken line is an error)."""
    return [record for _, record in iter_records(path)]


class JsonlLog:
    """An append-only JSONL file of per-iteration records.

    ``clean`` turns a record into what is written (default :func:`clean_record`: flat,
    finite-or-null scalars); None writes records as given (they must already be JSON-safe).
    """

    def __init__(self, path: str | Path, *,
                 clean: Optional[Callable[[Mapping[str, Any]], dict]] = clean_record):
        self.path = Path(path)
        self.clean = clean
        self.last_iteration: Optional[int] = None
        if self.path.exists():
            for _, record in iter_records(self.path, allow_torn_tail=True):
                self.last_iteration = record["iteration"]
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # a line cut short: drop it before appending
                self.truncate_after(self.last_iteration)

    def truncate_after(self, iteration: Optional[int]) -> int:
        """Keep only records with ``iteration <= iteration`` (None: keep none); returns kept."""
        kept: list[dict] = []
        if self.path.exists():
            kept = [r for _, r in iter_records(self.path, allow_torn_tail=True)
                    if iteration is not None and r["iteration"] <= iteration]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.last_iteration = kept[-1]["iteration"] if kept else None
        return len(kept)

    def append(self, record: Mapping[str, Any]) -> dict:
        """Validate, clean and append one record; returns what was written."""
        record = self.clean(record) if self.clean is not None else dict(record)
        it = _check_iteration(record, str(self.path))
        if self.last_iteration is not None and it <= self.last_iteration:
            raise RunLogError(f"{self.path}: iteration {it} logged after iteration "
                              f"{self.last_iteration}; iterations must increase")
        line = json.dumps(record, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.last_iteration = it
        return record


def allocation_record(iteration: int, samples: Mapping[str, int], *,
                      accept_rate: Optional[Mapping[str, float]] = None,
                      grad_norm: Optional[Mapping[str, float]] = None,
                      rounds: Optional[Mapping[str, Sequence[int]]] = None) -> dict:
    """One ``allocations.jsonl`` row: ``{"iteration", "samples": {prompt_id: n}, ...}``.

    ``accept_rate`` and ``grad_norm`` (per prompt id, optional) record the statistics the
    allocation was made from (its last round's); non-finite values are written as null.
    ``rounds`` (stage 2 drawn in rounds) holds each prompt's count per round.
    """
    row: dict[str, Any] = {"iteration": int(iteration)}
    bad = [k for k, n in samples.items() if isinstance(n, bool) or int(n) != n or n < 0]
    if bad:
        raise ValueError(f"allocation for prompt {bad[0]!r}: {samples[bad[0]]!r} is not a "
                         "sample count >= 0")
    row["samples"] = {str(k): int(n) for k, n in samples.items()}
    for name, values in (("accept_rate", accept_rate), ("grad_norm", grad_norm)):
        if values is not None:
            row[name] = {str(k): _scalar(f"{name}[{k}]", v) for k, v in values.items()}
    if rounds is not None:
        row["rounds"] = {str(k): [int(n) for n in v] for k, v in rounds.items()}
    return row
