"""The run directory: config, metrics.jsonl, allocations.jsonl, TensorBoard, W&B, logs, bars."""
from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch

from gvm_mega.config import load_config
from gvm_mega.runlog import (JsonlLog, RunLogError, RunLogger, default_run_dir, format_summary,
                             phase_key, read_records, resolve_run_dir)


def _cfg(*overrides: str, tensorboard: bool = False):
    return load_config(None, ["train.iterations=4", f"logging.tensorboard={str(tensorboard).lower()}",
                              *overrides])


def _record(it: int) -> dict:
    """A full iteration record, as the training loop writes it."""
    return {"iteration": it, "samples_total": 96 * it, "tokens_generated": 1000 * it,
            "accept_rate_mean": 0.1 * it, "grad_norm_mean": 2.0 + it, "alloc_min": 0,
            "alloc_max": 10 + it, "variance_ratio": 0.5, "loss": 1.0 / (it + 1), "kl": 0.0,
            "entropy": 1.5, "lr": 1e-5, phase_key("stage1"): 0.5, phase_key("train"): 1.25,
            "eval_accuracy": 0.3 + 0.1 * it if it in (0, 4) else None}


def _open(cfg, path, console=None, **kw) -> RunLogger:
    return RunLogger.start(cfg, path, console=console or io.StringIO(), **kw)


def test_metrics_are_cleaned_ordered_and_read_back(tmp_path):
    log = JsonlLog(tmp_path / "metrics.jsonl")
    written = log.append({"iteration": 1, "loss": float("nan"), "kl": float("inf"),
                          "lr": np.float32(0.5), "entropy": torch.tensor(2.0),
                          "samples_total": np.int64(7), "ok": True, "note": "x"})
    assert written == {"iteration": 1, "loss": None, "kl": None, "lr": 0.5, "entropy": 2.0,
                       "samples_total": 7, "ok": True, "note": "x"}
    assert isinstance(written["samples_total"], int)
    with pytest.raises(RunLogError, match="iteration 1 logged after iteration 1"):
        log.append({"iteration": 1})
    with pytest.raises(TypeError, match="metric 'alloc': expected a number"):
        log.append({"iteration": 2, "alloc": [1, 2]})
    with pytest.raises(RunLogError, match="'iteration' must be an integer"):
        log.append({"loss": 1.0})
    log.append({"iteration": 3, "loss": 0.25})
    assert [r["iteration"] for r in read_records(log.path)] == [1, 3]
    text = log.path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    # Reading is strict and names file and line.
    log.path.write_text(text + '{"iteration": 5, "loss": \n{"iteration": 6}\n')
    with pytest.raises(RunLogError, match=r"metrics.jsonl:3: not valid JSON"):
        read_records(log.path)
    log.path.write_text('{"iteration": 2}\n\n{"iteration": 2}\n')
    with pytest.raises(RunLogError, match=r"metrics.jsonl:3: iteration 2 does not follow"):
        read_records(log.path)
    log.path.write_text('[1, 2]\n')
    with pytest.raises(RunLogError, match=r"metrics.jsonl:1: expected a JSON object"):
        read_records(log.path)


def test_resume_continues_metrics_as_if_never_interrupted(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with _open(_cfg(tensorboard=True), straight) as run:
        for it in range(5):
            run.log_iteration(_record(it))
            run.log_allocation(it, {"a": it, "b": 2})
    with _open(_cfg(tensorboard=True), killed) as run:
        for it in range(5):  # iterations 3-4 are "lost": the checkpoint is after iteration 2
            run.log_iteration(dict(_record(it), loss=99.0) if it > 2 else _record(it))
            run.log_allocation(it, {"a": 50, "b": 50} if it > 2 else {"a": it, "b": 2})
    with open(killed / "metrics.jsonl", "a") as f:  # a SIGKILL in the middle of a write
        f.write('{"iteration": 5, "samples_to')
    with _open(_cfg(tensorboard=True), killed, resume_iteration=2) as run:
        assert [r["iteration"] for r in read_records(killed / "metrics.jsonl")] == [0, 1, 2]
        assert [r["iteration"] for r in read_records(killed / "allocations.jsonl")] == [0, 1, 2]
        for it in (3, 4):
            run.log_iteration(_record(it))
            run.log_allocation(it, {"a": it, "b": 2})
    for name in ("metrics.jsonl", "allocations.jsonl"):
        assert (killed / name).read_text() == (straight / name).read_text()
    events = EventAccumulator(str(killed / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(it, pytest.approx(1.0 / (it + 1))) for it in range(5)]  # 99s purged
    assert {"eval/accuracy", "time/stage1_s", "train/accept_rate_mean"} <= set(
        events.Tags()["scalars"])
    # A restart with no checkpoint starts the metrics over.
    with _open(_cfg(), killed, resume_iteration=None):
        assert read_records(killed / "metrics.jsonl") == []


def test_run_dir_reuse_rules(tmp_path):
    path = tmp_path / "run"
    with _open(_cfg(), path) as run:
        run.log_iteration(_record(0))
    saved = load_config(path / "config.yaml")
    assert saved.train.iterations == 4 and saved.run.run_dir == str(path)
    # Resuming with a longer schedule is allowed and the change is logged.
    console = io.StringIO()
    with _open(_cfg("train.iterations=8"), path, console=console, resume_iteration=0):
        pass
    assert "train.iterations: 4 -> 8" in console.getvalue()
    assert load_config(path / "config.yaml").train.iterations == 8
    # A different experiment in the same directory is refused, naming the keys.
    with pytest.raises(RunLogError, match=r"different config \(optim.lr: 1e-06 -> 0.01; "
                                          r"run.seed: 1234 -> 5\)"):
        _open(_cfg("train.iterations=8", "optim.lr=0.01", "run.seed=5"), path)
    with pytest.raises(RunLogError, match="already holds a run; pass another --run-dir"):
        _open(_cfg("checkpoint.resume=false"), path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    with pytest.raises(RunLogError, match="not empty and has no config.yaml"):
        _open(_cfg(), other)
    cfg = _cfg("run.name=demo")
    assert resolve_run_dir(cfg, "x/y").as_posix() == "x/y"
    assert default_run_dir("demo", now=0).name.startswith("demo-19")
    assert resolve_run_dir(cfg).parent.name == "runs" and resolve_run_dir(cfg).name.startswith("demo-")
    cfg.run.run_dir = "elsewhere"
    assert resolve_run_dir(cfg).as_posix() == "elsewhere"


def test_console_log_file_progress_and_summary(tmp_path):
    console = io.StringIO()
    with _open(_cfg(), tmp_path / "run", console=console) as run:
        assert not run.progress_enabled  # not a terminal
        with run.progress("stage1", total=3) as bar:
            bar.update(3)
        run.log_iteration(_record(1))
        run.info("checkpoint saved")
        import logging
        logging.getLogger("gvm_mega.data.loader").warning("dropped 3 prompts")
    printed = console.getvalue().splitlines()
    logged = [line.split(" ", 3)[3] for line in (tmp_path / "run" / "train.log").read_text().splitlines()]
    assert printed == logged and len(printed) == 4
    assert printed[1] == ("it 1/4 | samples 96 | tokens 1.0k | reward 0.100 | G 3 | n 0..11 | "
                          "var 0.500 | loss 0.5 | kl 0 | ent 1.5 | lr 1.00e-05 | "
                          "1.8s (train 1.2 stage1 0.5)")
    assert printed[2:] == ["checkpoint saved", "dropped 3 prompts"]
    assert format_summary({"iteration": 0, "eval_accuracy": 0.25, "loss": None,
                           "samples_total": 1_234_567}) == "it 0 | samples 1.2M | eval 0.250"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    with _open(_cfg(), tmp_path / "tty", console=term) as run:
        assert run.progress_enabled
        with run.progress("stage2", total=4, unit="sample") as bar:
            bar.update(4)
    assert "stage2:" in term.getvalue() and "0/4 [" in term.getvalue()  # the bar was drawn
    with _open(_cfg("logging.progress_bars=false"), tmp_path / "off", console=Terminal()) as run:
        assert not run.progress_enabled


def test_wandb_is_optional_and_lazy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RunLogError, match="wandb is not installed; pip install wandb"):
        _open(_cfg("logging.wandb_project=gvm"), tmp_path / "a")

    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for resume in (None, 0):
        with _open(_cfg("logging.wandb_project=gvm"), tmp_path / "b", resume_iteration=resume) as run:
            run.log_iteration(_record(1))
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["project"] == "gvm" and inits[0]["resume"] == "allow"
    assert inits[0]["id"] == inits[1]["id"]  # the resumed run continues the same W&B run
    assert inits[0]["config"]["train"]["iterations"] == 4
    logs = [c for c in calls if c[0] == "log"]
    assert logs[0][1] == 1 and logs[0][2]["train/loss"] == 0.5
    assert "train/iteration" not in logs[0][2] and "eval/accuracy" not in logs[0][2]
    assert calls.count(("finish",)) == 2


def test_other_ranks_write_nothing(tmp_path):
    run = RunLogger.start(_cfg(), tmp_path / "rank1", enabled=False)
    run.log_iteration(_record(0))
    run.log_allocation(0, {"a": 1})
    run.info("hidden")
    with run.progress("stage1", 2) as bar:
        bar.update(2)
    run.close()
    assert not (tmp_path / "rank1").exists()
