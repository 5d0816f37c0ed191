"""The run directory: where a run's config, metrics, event files, logs and checkpoints live.

Layout::

    RUN_DIR/config.yaml          the resolved config (load_config reads it back)
    RUN_DIR/metrics.jsonl        one object per iteration
    RUN_DIR/allocations.jsonl    {"iteration", "samples": {prompt_id: n}} per iteration
    RUN_DIR/train.log            everything printed, plus warnings
    RUN_DIR/tensorboard/         TensorBoard event files
    RUN_DIR/checkpoints/         checkpoints

Reusing a directory: a directory that already holds a run (``config.yaml``) is continued only
when ``checkpoint.resume`` is true, and only when its saved config equals the new one except
for keys that do not change what is computed (``RESUMABLE_KEYS``: iteration count, schedules,
logging, parallel layout, server addresses). Anything else is an error listing the differing
keys, so that two different experiments never share one ``metrics.jsonl``. With
``checkpoint.resume=false`` a directory that already has metrics or checkpoints is refused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gvm_mega.runlog.records import RunLogError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
ALLOCATIONS_FILE = "allocations.jsonl"
LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"

# Keys that may differ between a run's saved config and the config that resumes it:
# "section.key", or "section.*" for a whole section.
RESUMABLE_KEYS = (
    "run.run_dir",
    "train.iterations",
    "train.eval_every",
    "checkpoint.*",
    "logging.*",
    "parallel.*",
    "rollout.urls",
    "rollout.worker_urls",
    "rollout.weights_dir",
    "rollout.concurrency",
    "rollout.request_timeout_s",
    "rollout.max_retries",
    "rollout.retry_backoff_s",
    "reward.workers",
)


def default_run_dir(run_name: str, *, root: str | Path = "runs",
                    now: Optional[float] = None) -> Path:
    """``runs/<run.name>-<YYYYmmdd-HHMMSS>`` (local time)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return Path(root) / f"{run_name}-{stamp}"


def resolve_run_dir(cfg: Any, run_dir: Optional[str | Path] = None) -> Path:
    """``--run-dir`` if given, else ``run.run_dir``, else :func:`default_run_dir`."""
    if run_dir is not None:
        return Path(run_dir)
    if cfg.run.run_dir:
        return Path(cfg.run.run_dir)
    return default_run_dir(cfg.run.name)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def config_differences(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every key whose value differs between two configs."""
    from gvm_mega.config.loader import config_to_dict

    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def allocations(self) -> Path:
        return self.path / ALLOCATIONS_FILE

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def has_results(self) -> bool:
        """True when the directory holds metrics or checkpoints of an earlier run."""
        metrics = self.metrics.is_file() and self.metrics.stat().st_size > 0
        checkpoints = self.checkpoints.is_dir() and any(self.checkpoints.iterdir())
        return metrics or checkpoints


def prepare_run_dir(cfg: Any, path: str | Path) -> tuple[RunDir, list[tuple[str, Any, Any]]]:
    """Create or reopen ``path`` for ``cfg`` and save the resolved ``config.yaml``.

    Returns the run directory and the (resumable) config keys that changed since the saved
    config. Raises :class:`RunLogError` when the directory cannot be used for this config
    (see the module docstring for the rules).
    """
    from gvm_mega.config import ConfigError, load_config, save_config

    run = RunDir(Path(path))
    if run.path.exists() and not run.path.is_dir():
        raise RunLogError(f"run directory {run.path}: exists and is not a directory")
    changed: list[tuple[str, Any, Any]] = []
    if run.config.is_file():
        if not cfg.checkpoint.resume and run.has_results():
            raise RunLogError(f"run directory {run.path} already holds a run; pass another "
                              f"--run-dir, or checkpoint.resume=true to continue it")
        try:
            old = load_config(run.config)
        except ConfigError as exc:
            raise RunLogError(f"run directory {run.path}: its {CONFIG_FILE} no longer loads "
                              f"({exc}); use another --run-dir") from None
        diffs = config_differences(old, cfg)
        fixed = [d for d in diffs if not _resumable(d[0])]
        if fixed and run.has_results():
            shown = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in fixed[:8])
            more = f" (and {len(fixed) - 8} more)" if len(fixed) > 8 else ""
            raise RunLogError(f"run directory {run.path} holds a run with a different config "
                              f"({shown}{more}); use another --run-dir, or the saved "
                              f"{run.config} to continue that run")
        changed = diffs
    elif run.path.is_dir() and any(run.path.iterdir()):
        raise RunLogError(f"run directory {run.path}: not empty and has no {CONFIG_FILE}; "
                          f"it is not a run directory, choose another --run-dir")
    run.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config)
    return run, changed
