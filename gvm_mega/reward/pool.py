"""Worker processes that run Math-Verify with a hard wall-clock limit per job.

Math-Verify can spend minutes (or all memory) on an adversarial answer, in C code that no
signal interrupts. Each job therefore runs in a separate process; the pool starts a job's clock
when it hands the job to an idle worker and kills the worker (SIGKILL) when the clock passes
the limit. The job scores 0 and a fresh worker takes the dead one's place, so no model output
can hang or crash the caller.
"""
from __future__ import annotations

import math
import os
import selectors
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

from gvm_mega.reward.protocol import read_message, write_message


@dataclass(frozen=True)
class JobResult:
    """Outcome of one verification: ``status`` is ok, timeout, crash or error."""

    correct: bool
    status: str
    seconds: float
    error: Optional[str] = None


class _Worker:
    def __init__(self, memory_mb: int):
        # the worker imports this package from wherever the caller found it
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, GVM_MEGA_VERIFIER_MEMORY_MB=str(memory_mb),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gvm_mega.reward.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
            bufsize=0)  # unbuffered: select() must see every byte the worker wrote
        self.started = time.monotonic()
        self.ready = False
        self.job: Optional[int] = None
        self.job_started = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, job_id: int, message: tuple) -> None:
        self.job = job_id
        self.job_started = time.monotonic()
        write_message(self.proc.stdin, message)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class VerifierPool:
    """A fixed number of verifier processes; :meth:`run` verifies a batch in order.

    ``memory_mb`` caps each worker's address space (0: no cap). ``start_timeout`` bounds how
    long a worker may take to import Math-Verify before the pool gives up with an error.
    """

    def __init__(self, workers: int = 2, *, memory_mb: int = 4096, start_timeout: float = 120.0):
        if workers < 1:
            raise ValueError(f"a verifier pool needs at least 1 worker, got {workers}")
        self.size = workers
        self.memory_mb = memory_mb
        self.start_timeout = start_timeout
        self._workers: list[_Worker] = []
        self.kills = 0
        self.crashes = 0

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def _spawn(self) -> _Worker:
        worker = _Worker(self.memory_mb)
        self._workers.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)
        self._spawn()

    def run(self, jobs: Sequence[tuple[str, tuple[str, ...]]], timeout: float) -> list[JobResult]:
        """Verify ``(answer, golds)`` pairs; result ``i`` belongs to job ``i``."""
        if not timeout > 0:
            raise ValueError(f"the verification timeout must be > 0 seconds, got {timeout}")
        soft = effective_soft_timeout(timeout)
        results: list[Optional[JobResult]] = [None] * len(jobs)
        pending = deque(range(len(jobs)))
        while len(self._workers) < self.size:
            self._spawn()
        selector = selectors.DefaultSelector()
        try:
            while pending or any(w.job is not None for w in self._workers):
                for worker in self._workers:
                    if worker.ready and worker.job is None and pending:
                        i = pending.popleft()
                        answer, golds = jobs[i]
                        try:
                            worker.send(i, (i, answer, golds, soft))
                        except (BrokenPipeError, OSError):
                            pending.appendleft(i)
                            worker.job = None
                            self.crashes += 1
                            self._replace(worker)
                            break
                self._wait(selector, results, timeout)
        except BaseException:
            self.close()  # in-flight jobs of an abandoned batch must not answer the next one
            raise
        finally:
            selector.close()
        return results  # type: ignore[return-value]

    def _wait(self, selector: selectors.BaseSelector, results: list, timeout: float) -> None:
        now = time.monotonic()
        deadlines = []
        for w in self._workers:
            if w.job is not None:
                deadlines.append(w.job_started + timeout)
            elif not w.ready:
                deadlines.append(w.started + self.start_timeout)
        wait = max(0.0, min(deadlines) - now) if deadlines else 0.0
        for w in self._workers:
            selector.register(w.proc.stdout, selectors.EVENT_READ, w)
        try:
            events = selector.select(timeout=wait)
        finally:
            for w in self._workers:
                selector.unregister(w.proc.stdout)
        for key, _ in events:
            worker: _Worker = key.data
            try:
                message = read_message(worker.proc.stdout)
            except Exception:  # noqa: BLE001 — a garbled stream means a broken worker
                message = None
            if message is None:
                self._on_crash(worker, results)
            elif message[0] == "ready":
                worker.ready = True
            elif worker.job is not None and message[0] == worker.job:
                _, correct, error = message
                seconds = time.monotonic() - worker.job_started
                results[worker.job] = JobResult(bool(correct), "error" if error else "ok",
                                                seconds, error)
                worker.job = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.job is not None and now - worker.job_started >= timeout:
                results[worker.job] = JobResult(False, "timeout", now - worker.job_started)
                self.kills += 1
                self._replace(worker)
            elif not worker.ready and worker.job is None and now - worker.started > self.start_timeout:
                raise RuntimeError(
                    f"a verifier worker (pid {worker.pid}) did not start within "
                    f"{self.start_timeout:.0f} s; is math-verify installed? "
                    f"(python -c 'import math_verify')")

    def _on_crash(self, worker: _Worker, results: list) -> None:
        if worker.job is not None:
            results[worker.job] = JobResult(False, "crash", time.monotonic() - worker.job_started,
                                            f"worker exited with code {worker.proc.poll()}")
            worker.job = None
        elif not worker.ready:
            worker.kill()
            raise RuntimeError(
                f"a verifier worker exited while starting (code {worker.proc.returncode}); "
                f"check that `python -m gvm_mega.reward.worker` runs and math-verify is installed")
        self.crashes += 1
        self._replace(worker)

    def close(self) -> None:
        """Stop every worker (closing stdin lets idle ones exit; any left are killed)."""
        for worker in self._workers:
            try:
                worker.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            worker.kill()
        self._workers.clear()

    def __del__(self) -> None:  # best effort; close() is the real API
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def effective_soft_timeout(timeout: float) -> int:
    """Math-Verify's own per-stage alarm for a hard limit ``timeout`` (whole seconds, >= 1)."""
    return max(1, int(math.floor(timeout / 3)))
