"""JSONL and parquet prompt readers with configurable fields and a malformed-row policy.

A row is malformed when it is not UTF-8, not valid JSON, not an object, or lacks a non-empty
problem (a string) or answer (a number, a string or a list of them, as the reward accepts). With ``on_bad_row="error"``
the first such row raises :class:`DataError` naming file and line; with ``"skip"`` it is
skipped and counted in :class:`ReadStats` by reason. Problems in the file as a whole (missing,
unreadable, a column absent, nothing usable) always raise.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from gvm_mega.data.records import DataError, Prompt, PromptSet, ReadStats, content_id
from gvm_mega.reward.gold import normalize_gold

BadRowPolicy = Literal["error", "skip"]
log = logging.getLogger(__name__)


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed row or _BadRow) per non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, _BadRow("non-UTF-8", f"not valid UTF-8 (byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as exc:
                yield where, _BadRow("broken JSON", f"broken JSON ({exc.msg} at column {exc.colno})")


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 — pyarrow raises several types for bad files
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                        f"set data.prompt_field / data.answer_field / data.id_field")
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


def _field(record: dict, name: str, kind: str) -> Any:
    if name not in record:
        raise _BadRow(f"missing {kind}",
                      f"missing field {name!r} (fields present: {', '.join(map(str, record)) or 'none'})")
    value = record[name]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadRow("non-UTF-8", f"field {name!r} is not valid UTF-8") from None
    return value


def _to_prompt(record: Any, prompt_field: str, answer_field: str,
               id_field: Optional[str]) -> Prompt:
    if isinstance(record, _BadRow):
        raise record
    if not isinstance(record, dict):
        raise _BadRow("not an object", f"expected a JSON object, got {type(record).__name__}")
    problem = _field(record, prompt_field, "problem")
    if not isinstance(problem, str):
        raise _BadRow("bad problem", f"field {prompt_field!r} must be a string, "
                                     f"got {type(problem).__name__}")
    if not problem.strip():
        raise _BadRow("empty problem", f"field {prompt_field!r} is empty")
    answer = _field(record, answer_field, "answer")
    if answer is None or answer == "" or answer == [] or (isinstance(answer, str) and not answer.strip()):
        raise _BadRow("empty answer", f"field {answer_field!r} is empty")
    try:
        normalize_gold(answer, where=f"field {answer_field!r}")
    except ValueError as exc:  # e.g. true, {"a": 1}: nothing a response could equal
        raise _BadRow("bad answer", str(exc)) from None
    if id_field is not None:
        raw_id = _field(record, id_field, "id")
        if raw_id is None or str(raw_id) == "":
            raise _BadRow("empty id", f"field {id_field!r} is empty")
        prompt_id = str(raw_id)
    else:
        prompt_id = content_id(problem)
    solution = record.get("solution")
    meta = {k: v for k, v in record.items()
            if k not in (prompt_field, answer_field, id_field, "solution")}
    return Prompt(id=prompt_id, problem=problem, answer=answer,
                  solution=solution if isinstance(solution, str) else None, meta=meta)


def read_prompts(path: str | Path, *, prompt_field: str = "problem", answer_field: str = "answer",
                 id_field: Optional[str] = None, on_bad_row: BadRowPolicy = "error",
                 dedupe: bool = True) -> PromptSet:
    """Read a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` prompt file.

    With ``dedupe`` a problem seen before (same text up to whitespace) is dropped and counted.
    Without it, a repeated problem's id gets a ``~k`` suffix so ids stay unique. A repeated id from
    ``id_field`` that names a different problem is a malformed row.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl_rows(path)
    elif suffix in (".parquet", ".pq"):
        columns = [prompt_field, answer_field] + ([id_field] if id_field else [])
        rows = _parquet_rows(path, columns)
    else:
        raise DataError(f"{path}: unknown prompt file type {suffix!r}; "
                        f"expected .jsonl or .parquet")
    stats = ReadStats(source=str(path))
    prompts: list[Prompt] = []
    seen_text: dict[str, str] = {}      # content id -> location first seen
    seen_ids: dict[str, tuple[str, str]] = {}  # id -> (content id, location)
    for where, record in rows:
        stats.rows += 1
        try:
            prompt = _to_prompt(record, prompt_field, answer_field, id_field)
            text_key = content_id(prompt.problem)
            if id_field is not None and prompt.id in seen_ids and seen_ids[prompt.id][0] != text_key:
                raise _BadRow("duplicate id", f"id {prompt.id!r} already used at "
                                              f"{seen_ids[prompt.id][1]} for a different problem")
        except _BadRow as bad:
            if on_bad_row == "error":
                raise DataError(f"{where}: {bad} (set data.on_bad_row=skip to skip such rows)") from None
            stats.skip(bad.reason, f"{where}: {bad}")
            continue
        if text_key in seen_text:
            if dedupe:
                stats.duplicates += 1
                continue
            k = 2
            while f"{prompt.id}~{k}" in seen_ids:
                k += 1
            prompt = Prompt(prompt.id + f"~{k}", prompt.problem, prompt.answer,
                            prompt.solution, prompt.meta)
        seen_text.setdefault(text_key, where)
        seen_ids.setdefault(prompt.id, (text_key, where))
        prompts.append(prompt)
    stats.kept = len(prompts)
    if not prompts:
        raise DataError(f"{path}: no usable prompts ({stats.summary()})")
    if stats.skipped:
        log.warning("%s; first: %s", stats.summary(), stats.skipped_examples[0])
    return PromptSet(prompts, stats)
