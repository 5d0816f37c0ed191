"""Hypothesis strategies and small helpers shared by the allocation tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

# Acceptance rates as stage 1 produces them (multiples of 1/8) mixed with arbitrary ones.
rates = st.one_of(st.sampled_from([k / 8 for k in range(9)]),
                  st.floats(0.0, 1.0, allow_nan=False))
norms = st.one_of(st.just(0.0), st.floats(1e-3, 1e3, allow_nan=False))


@st.composite
def prompt_stats(draw, min_size: int = 1, max_size: int = 40):
    """(grad_norms, accept_rates) arrays of equal length."""
    m = draw(st.integers(min_size, max_size))
    g = np.array(draw(st.lists(norms, min_size=m, max_size=m)))
    p = np.array(draw(st.lists(rates, min_size=m, max_size=m)))
    return g, p


@st.composite
def positive_stats(draw, min_size: int = 1, max_size: int = 30,
                   p_min: float = 0.05, g_range=(0.1, 10.0)):
    """Stats where every prompt is eligible, in ranges where the rule is well conditioned."""
    m = draw(st.integers(min_size, max_size))
    g = np.array(draw(st.lists(st.floats(*g_range), min_size=m, max_size=m)))
    p = np.array(draw(st.lists(st.floats(p_min, 1.0), min_size=m, max_size=m)))
    return g, p


def write_jsonl(path: Path, rows) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings (written as they are)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path
