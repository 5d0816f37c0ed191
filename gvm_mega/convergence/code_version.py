"""Which code made a benchmark's runs: a digest of the package's Python source.

A resumed ``--out`` reuses its finished arms; if the trainer changed in between, the table
would set runs of two different trainers side by side. The digest covers every ``.py`` file
of the installed ``gvm_mega`` package (the arms are child processes importing the same one),
so it changes with any edit, committed or not, and needs no git.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parents[1]


def source_digest(package: Optional[Path] = None) -> str:
    """sha256 (first 16 hex digits) over the package's ``.py`` files: relative path and bytes."""
    root = package or PACKAGE
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        h.update(rel.encode("utf-8") + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


__all__ = ["source_digest"]
