"""A run's outputs: the run directory, per-iteration metrics, TensorBoard/W&B, logs, progress.

``RunLogger.start(cfg, run_dir, resume_iteration=...)`` opens everything; the loop calls
``log_iteration(record)``, ``log_allocation(iteration, samples)``, ``progress(phase, total)``
and ``info(message)``. ``read_records`` reads ``metrics.jsonl`` / ``allocations.jsonl`` back
with errors that name file and line.
"""
from gvm_mega.runlog.logger import RunLogger
from gvm_mega.runlog.records import (JsonlLog, RunLogError, allocation_record, clean_record,
                                     iter_records, read_records)
from gvm_mega.runlog.rundir import (ALLOCATIONS_FILE, CONFIG_FILE, LOG_FILE, METRICS_FILE,
                                    RESUMABLE_KEYS, RunDir, config_differences, default_run_dir,
                                    prepare_run_dir, resolve_run_dir)
from gvm_mega.runlog.sinks import TensorBoardSink, WandbSink, scalar_tag
from gvm_mega.runlog.summary import METRIC_KEYS, PHASES, format_summary, phase_key

__all__ = ["ALLOCATIONS_FILE", "CONFIG_FILE", "LOG_FILE", "METRICS_FILE", "METRIC_KEYS", "PHASES",
           "RESUMABLE_KEYS", "JsonlLog", "RunDir", "RunLogError", "RunLogger", "TensorBoardSink",
           "WandbSink", "allocation_record", "clean_record", "config_differences",
           "default_run_dir", "format_summary", "iter_records", "phase_key", "prepare_run_dir",
           "read_records", "resolve_run_dir", "scalar_tag"]
