"""A verifier worker process: reads jobs on stdin, writes verdicts on stdout.

Run as ``python -m gvm_mega.reward.worker``. Started by :class:`VerifierPool`, which kills it
when a job runs past its wall-clock limit, so nothing here has to be interruptible. Messages
are framed by :mod:`gvm_mega.reward.protocol`. Math-Verify's own ``signal.alarm``
timeouts stay on as a cheap first line (they work here: this is a main thread), and the
process's address space is capped so a runaway big-integer power fails with MemoryError
instead of exhausting the machine.
"""
from __future__ import annotations

import functools
import logging
import os
import resource
import sys

from gvm_mega.reward.protocol import read_message, write_message


@functools.lru_cache(maxsize=8192)
def _parse(latex: str, soft_timeout: int) -> list:
    """Parse once per worker: a GVM group shares one gold, and answers repeat."""
    from math_verify import parse

    return parse("\\boxed{" + latex + "}", parsing_timeout=soft_timeout)


def verify_answer(answer: str, golds: tuple[str, ...], soft_timeout: int) -> bool:
    """True when ``answer`` equals any of ``golds`` according to Math-Verify."""
    from math_verify import verify

    predicted = _parse(answer, soft_timeout)
    if not predicted:
        return False
    for gold in golds:
        parsed_gold = _parse(gold, soft_timeout)
        if parsed_gold and verify(parsed_gold, predicted, timeout_seconds=soft_timeout):
            return True
    return False


def main() -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    inp = sys.stdin.buffer
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (warm the import before reporting ready)

    verify_answer("1", ("1",), 1)  # first call builds parser tables (~0.1 s)
    memory_mb = int(os.environ.get("GVM_MEGA_VERIFIER_MEMORY_MB", "0"))
    if memory_mb > 0:
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    write_message(out, ("ready", os.getpid()))
    while True:
        job = read_message(inp)
        if job is None:
            return
        job_id, answer, golds, soft_timeout = job
        try:
            ok, error = verify_answer(answer, golds, soft_timeout), None
        except BaseException as exc:  # noqa: BLE001 — any failure to verify scores 0
            ok, error = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        write_message(out, (job_id, ok, error))


if __name__ == "__main__":
    main()
