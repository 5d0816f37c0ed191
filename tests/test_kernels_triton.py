"""Triton ghost-norm kernels under the CPU interpreter against fp64 per-sequence autograd.

The checks run in one subprocess with TRITON_INTERPRET=1, which must be set before triton
is first imported; fp64 runs must match to 1e-6, fp32 runs to 1e-5.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

CASES = ["lm_head_fp64", "lm_head_fp64_small_blocks", "lm_head_fp32", "lm_head_shards",
         "embedding_fp64", "embedding_fp64_small_blocks", "embedding_fp32", "embedding_shards",
         "linear_weight_fp64", "linear_bias_fp64", "linear_weight_fp64_small_blocks",
         "linear_weight_fp32"] + [f"estimator_{p}_{t}_fp64" for p in ("embedding", "lm_head", "linear")
                                  for t in ("untied", "tied")]


@pytest.fixture(scope="module")
def results() -> dict:
    script = Path(__file__).with_name("_kernels_triton_cases.py")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in out, out["error"]
    return out


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_matches_autograd(results, case):
    tol = 1e-5 if case.endswith("fp32") else 1e-6
    assert case in results, f"case {case} did not run"
    assert results[case] <= tol, (case, results[case])
