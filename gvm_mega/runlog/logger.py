"""``RunLogger``: the one object the training loop reports to.

It owns the run directory and everything written there except checkpoints: the saved config,
``metrics.jsonl``, ``allocations.jsonl``, TensorBoard, W&B, ``train.log`` and the console
(summary lines and per-phase progress bars). Only the driver writes; on other ranks
(``enabled=False``) every method is a no-op, so the loop can call it unconditionally.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tqdm import tqdm

from gvm_mega.runlog.records import JsonlLog, allocation_record
from gvm_mega.runlog.rundir import RunDir, prepare_run_dir, resolve_run_dir
from gvm_mega.runlog.sinks import TensorBoardSink, WandbSink
from gvm_mega.runlog.summary import format_summary

LOGGER_NAME = "gvm_mega"


class _TqdmConsole(logging.Handler):
    """Console output that does not tear open progress bars."""

    def __init__(self, stream: Any):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 — logging must never raise into the loop
            self.handleError(record)


class RunLogger:
    """Logs one run. Create with :meth:`start`; call :meth:`close` (or use ``with``) at the end.

    ``resume_iteration`` is the last iteration the resumed checkpoint completed (None for a
    fresh start): records after it are cut from the JSONL files and hidden in TensorBoard,
    so the metrics continue as if the run had never been interrupted.
    """

    def __init__(self, run: Optional[RunDir], *, cfg: Any = None,
                 resume_iteration: Optional[int] = None, enabled: bool = True,
                 console: Any = None, progress_bars: bool = True):
        self.run = run
        self.enabled = enabled and run is not None
        self.iterations = getattr(getattr(cfg, "train", None), "iterations", None)
        self.logger = logging.getLogger(LOGGER_NAME)
        self._handlers: list[logging.Handler] = []
        self._saved_state: Optional[tuple[int, bool]] = None
        self._sinks: list[Any] = []
        self.metrics: Optional[JsonlLog] = None
        self.allocations: Optional[JsonlLog] = None
        stream = console if console is not None else sys.stdout
        self.progress_enabled = bool(progress_bars and self.enabled and _isatty(stream))
        self._stream = stream
        if not self.enabled:
            return
        self._setup_logging(stream)
        self.metrics = JsonlLog(run.metrics)
        self.metrics.truncate_after(resume_iteration)
        self.allocations = JsonlLog(run.allocations, clean=None)  # rows come cleaned
        self.allocations.truncate_after(resume_iteration)
        logging_cfg = getattr(cfg, "logging", None)
        if logging_cfg is not None and logging_cfg.tensorboard:
            if resume_iteration is not None:
                purge: Optional[int] = resume_iteration + 1
            else:  # a restart from scratch hides whatever an earlier attempt wrote
                purge = 0 if run.tensorboard.exists() else None
            self._sinks.append(TensorBoardSink(run.tensorboard, purge_step=purge))
        if logging_cfg is not None and logging_cfg.wandb_project:
            from gvm_mega.config.loader import config_to_dict
            self._sinks.append(WandbSink(logging_cfg.wandb_project, run.path,
                                         name=cfg.run.name, config=config_to_dict(cfg)))

    @property
    def path(self) -> Optional[Path]:
        """The run directory (None on ranks that do not log)."""
        return self.run.path if self.run is not None else None

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: Any, run_dir: Optional[str | Path] = None, *,
              resume_iteration: Optional[int] = None, enabled: bool = True,
              console: Any = None) -> "RunLogger":
        """Prepare the run directory (see :func:`prepare_run_dir`) and open every output.

        The directory is ``run_dir``, else ``run.run_dir``, else ``runs/<name>-<timestamp>``;
        ``cfg.run.run_dir`` is set to it so the saved config names where it lives.
        """
        if not enabled:
            return cls(None, cfg=cfg, enabled=False)
        path = resolve_run_dir(cfg, run_dir)
        cfg.run.run_dir = str(path)
        run, changed = prepare_run_dir(cfg, path)
        logger = cls(run, cfg=cfg, resume_iteration=resume_iteration, console=console,
                     progress_bars=cfg.logging.progress_bars)
        logger.info(f"run directory: {run.path}")
        if resume_iteration is not None:
            logger.info(f"resuming after iteration {resume_iteration}")
        for key, old, new in changed:
            logger.info(f"config changed since the last start: {key}: {old!r} -> {new!r}")
        return logger

    def _setup_logging(self, stream: Any) -> None:
        fmt = logging.Formatter("%(message)s")
        file_handler = logging.FileHandler(self.run.log, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        console = _TqdmConsole(stream)
        console.setFormatter(fmt)
        for handler in (file_handler, console):
            handler.setLevel(logging.INFO)
            self.logger.addHandler(handler)
            self._handlers.append(handler)
        self._saved_state = (self.logger.level, self.logger.propagate)
        if self.logger.level == logging.NOTSET or self.logger.level > logging.INFO:
            self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # printed here already; not again by a root handler

    # ---- reporting -----------------------------------------------------------------------
    def info(self, message: str) -> None:
        """Print a line and write it to ``train.log``."""
        if self.enabled:
            self.logger.info(message)

    def warning(self, message: str) -> None:
        if self.enabled:
            self.logger.warning(message)

    def log_iteration(self, record: Mapping[str, Any]) -> Optional[dict]:
        """Append one iteration's metrics everywhere and print its summary line."""
        if not self.enabled:
            return None
        written = self.metrics.append(record)
        for sink in self._sinks:
            sink.log(written)
        self.info(format_summary(written, iterations=self.iterations))
        return written

    def log_allocation(self, iteration: int, samples: Mapping[str, int], *,
                       accept_rate: Optional[Mapping[str, float]] = None,
                       grad_norm: Optional[Mapping[str, float]] = None,
                       rounds: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        """Append one row of ``allocations.jsonl`` (what ``gvm-mega plot`` histograms)."""
        if self.enabled:
            self.allocations.append(allocation_record(iteration, samples, accept_rate=accept_rate,
                                                      grad_norm=grad_norm, rounds=rounds))

    def progress(self, phase: str, total: Optional[int] = None, *, unit: str = "it") -> tqdm:
        """A progress bar for one phase; disabled (but still usable) when bars are off,
        stdout is not a terminal, or this rank does not log."""
        return tqdm(total=total, desc=phase, unit=unit, leave=False, dynamic_ncols=True,
                    file=self._stream, disable=not self.progress_enabled)

    # ---- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self._handlers = []
        if self._saved_state is not None:
            self.logger.setLevel(self._saved_state[0])
            self.logger.propagate = self._saved_state[1]
            self._saved_state = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
