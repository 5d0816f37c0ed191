"""Running the benchmark's training runs, each in its own ``python -m gvm_mega train`` process.

Megatron keeps process-wide state (parallel groups, RNG trackers), so every run gets a clean
process. Layout under the output directory::

    OUT/warm_start/run/        the warm-start run (supervised warm start, 0 RL iterations)
    OUT/warm_start/weights/    its weights as a plain model checkpoint: every arm's
                               ``checkpoint.load``
    OUT/runs/<algorithm>/seed<k>/   one run directory per arm
    OUT/logs/<name>.log        stdout and stderr of each process

A run whose directory already holds its final eval record is reused; an unfinished one with
a checkpoint is resumed by the trainer; an unfinished one without a checkpoint is restarted.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

# Files of a training checkpoint that make up a plain model checkpoint (weights only).
_MODEL_FILES = ("gvm_mega_model.json", "model")

_ECHO_LOCK = threading.Lock()


def echo_line(message: str) -> None:
    """Print one whole line at a time: ``print`` writes the text and its newline
    separately, so arms trained from parallel threads would run their lines together."""
    with _ECHO_LOCK:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


@dataclass
class ArmResult:
    """The outcome of one training process."""

    name: str
    run_dir: Path
    log: Path
    status: str  # "done" | "reused" | "failed"
    seconds: float = 0.0
    returncode: Optional[int] = None
    log_tail: str = ""
    algorithm: Optional[str] = None
    seed: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("done", "reused")

    def to_dict(self) -> dict:
        out = {"name": self.name, "algorithm": self.algorithm, "seed": self.seed,
               "run_dir": str(self.run_dir), "log": str(self.log), "status": self.status,
               "seconds": round(self.seconds, 2)}
        if not self.ok:
            out.update(returncode=self.returncode, log_tail=self.log_tail)
        if "curve" in self.extra:
            out["curve"] = self.extra["curve"]
        return out


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def final_iteration_done(run_dir: Path, iterations: int) -> bool:
    """True when ``metrics.jsonl`` has the eval record of the last iteration."""
    from gvm_mega.runlog import METRICS_FILE, RunLogError, read_records

    path = run_dir / METRICS_FILE
    if not path.is_file():
        return False
    try:
        records = read_records(path)
    except RunLogError:
        return False
    return any(r["iteration"] == iterations and r.get("eval_accuracy") is not None
               for r in records)


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").is_file()


def _process_env(threads: Optional[int]) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def train_command(config: str, run_dir: Path, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "gvm_mega", "train", config, "--run-dir", str(run_dir),
            *overrides]


def run_training(name: str, config: str, run_dir: Path, overrides: Sequence[str],
                 iterations: int, log_dir: Path, *, threads: Optional[int] = None,
                 echo: Callable[[str], None] = echo_line) -> ArmResult:
    """Run (or reuse, or resume) one training run to ``iterations`` in a fresh process.

    ``threads`` sets the process's torch threads (``OMP_NUM_THREADS``): float reductions,
    and so a long run's curve, depend on it, so a benchmark fixes it for every arm.
    """
    log = log_dir / f"{name}.log"
    result = ArmResult(name=name, run_dir=run_dir, log=log, status="reused")
    if final_iteration_done(run_dir, iterations):
        echo(f"[{name}] finished earlier: reusing {run_dir}")
        return result
    if run_dir.exists() and not _has_checkpoint(run_dir):
        shutil.rmtree(run_dir)  # nothing to resume: start it again
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(config, run_dir, overrides)
    echo(f"[{name}] {' '.join(cmd[1:])}")
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              env=_process_env(threads))
    result.seconds = time.perf_counter() - start
    result.returncode = proc.returncode
    if proc.returncode == 0 and final_iteration_done(run_dir, iterations):
        result.status = "done"
        echo(f"[{name}] done in {result.seconds:.0f}s")
        return result
    result.status = "failed"
    result.log_tail = log_tail(log)
    if proc.returncode == 0:
        result.log_tail += (f"\n(exit status 0, but {run_dir}/metrics.jsonl has no eval record "
                            f"for iteration {iterations})")
    echo(f"[{name}] FAILED (exit status {proc.returncode}); last lines of {log}:\n"
         f"{result.log_tail}")
    return result


def export_weights(run_dir: Path, dest: Path) -> Path:
    """Copy the latest checkpoint's weights of ``run_dir`` to ``dest`` as a plain model
    checkpoint, which ``checkpoint.load`` reads as weights only (no optimizer, scheduler,
    counters or RNG state of the warm-start run)."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer}: no checkpoint to start the arms from")
    latest = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    missing = [item for item in _MODEL_FILES if not (latest / item).exists()]
    if missing:
        raise FileNotFoundError(f"{latest}: checkpoint lacks {', '.join(missing)}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in _MODEL_FILES:
        src = latest / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / item)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest


def weights_ready(dest: Path) -> bool:
    return all((dest / item).exists() for item in _MODEL_FILES)
