"""Job classes for tests/test_reliability.py, importable by `spark-worker --jobs-from tests`.

Every job records what happens to it by appending one JSON line to `runs.log` in the directory
named by `$RELIABILITY_RECORD_DIR`. A line has the event (`start`, `end`, `fail`, ...), the
job's label, its id and attempt when known, the pid of the process that runs it and the Unix
time. Each line is written with a single `write()` on a file opened with `O_APPEND`, so the
lines of concurrent workers do not interleave and a worker killed with SIGKILL leaves only
whole lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from spark_bg import CancelJob, Job, RetryJob, current_job

RECORD_DIR_ENV = "RELIABILITY_RECORD_DIR"
RECORD_FILE = "runs.log"


def record_path() -> Path:
    """Return the record file of the current test, named by `$RELIABILITY_RECORD_DIR`."""
    directory = os.environ.get(RECORD_DIR_ENV)
    if not directory:
        raise RuntimeError(f"${RECORD_DIR_ENV} is not set; the test sets it for each worker")
    return Path(directory) / RECORD_FILE


def record(event: str, label: str, **extra: Any) -> None:
    """Append one event of the job labelled `label` to the record file."""
    context = current_job()
    entry: dict[str, Any] = {
        "event": event,
        "label": label,
        "id": context.id if context is not None else None,
        "attempt": context.attempt if context is not None else None,
        "pid": os.getpid(),
        "t": time.time(),
    }
    entry.update(extra)
    line = (json.dumps(entry) + "\n").encode()
    fd = os.open(record_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_records() -> list[dict[str, Any]]:
    """Return every event recorded so far, oldest first."""
    path = record_path()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def previous_starts(label: str) -> int:
    """Return how many runs of `label` started before the current one."""
    return sum(
        1 for entry in read_records() if entry["event"] == "start" and entry["label"] == label
    )


class SleepJob(Job):
    """An async job that sleeps `seconds`, recording its start and its end."""

    def __init__(self, label: str, seconds: float = 0.0) -> None:
        self.label = label
        self.seconds = seconds

    async def run(self) -> None:
        record("start", self.label)
        await asyncio.sleep(self.seconds)
        record("end", self.label)


class FirstRunSlowJob(Job):
    """An async job whose first run sleeps `first_s` and whose later runs sleep `later_s`.

    Runs are counted from the record file, so a run interrupted by a crash counts as first.
    """

    def __init__(self, label: str, first_s: float, later_s: float = 0.0) -> None:
        self.label = label
        self.first_s = first_s
        self.later_s = later_s

    async def run(self) -> None:
        first = previous_starts(self.label) == 0
        record("start", self.label)
        try:
            await asyncio.sleep(self.first_s if first else self.later_s)
        except asyncio.CancelledError:
            record("cancelled", self.label)
            raise
        record("end", self.label)


class FirstRunSlowThreadJob(Job):
    """`FirstRunSlowJob` as a sync job, run in the worker's thread pool."""

    def __init__(self, label: str, first_s: float, later_s: float = 0.0) -> None:
        self.label = label
        self.first_s = first_s
        self.later_s = later_s

    def run(self) -> None:
        first = previous_starts(self.label) == 0
        record("start", self.label)
        time.sleep(self.first_s if first else self.later_s)
        record("end", self.label)


class FirstRunSlowProcessJob(Job):
    """`FirstRunSlowJob` as a sync job run in a child process."""

    run_in_process = True

    def __init__(self, label: str, first_s: float, later_s: float = 0.0) -> None:
        self.label = label
        self.first_s = first_s
        self.later_s = later_s

    def run(self) -> None:
        first = previous_starts(self.label) == 0
        record("start", self.label)
        time.sleep(self.first_s if first else self.later_s)
        record("end", self.label)


class AlwaysFailJob(Job):
    """Raises on every run; retried with a 0.2 s backoff base until its 3 attempts are used."""

    max_attempts = 3
    backoff_base_s = 0.2

    def __init__(self, label: str) -> None:
        self.label = label

    async def run(self) -> None:
        record("start", self.label)
        record("fail", self.label)
        raise RuntimeError(f"AlwaysFailJob {self.label} fails on purpose")


class FailFirstRunsJob(Job):
    """Raises on its first `failures` runs (counted from the record file), then succeeds."""

    max_attempts = 1

    def __init__(self, label: str, failures: int) -> None:
        self.label = label
        self.failures = failures

    async def run(self) -> None:
        starts = previous_starts(self.label)
        record("start", self.label)
        if starts < self.failures:
            record("fail", self.label)
            raise RuntimeError(f"FailFirstRunsJob {self.label} fails run {starts + 1} on purpose")
        record("end", self.label)


class RetryOnceJob(Job):
    """Raises `RetryJob(delay_s)` on its first attempt and finishes on the next one."""

    def __init__(self, label: str, delay_s: float) -> None:
        self.label = label
        self.delay_s = delay_s

    async def run(self) -> None:
        record("start", self.label)
        context = current_job()
        if context is not None and context.attempt == 1:
            record("retry", self.label)
            raise RetryJob(self.delay_s, reason="RetryOnceJob asks for a second attempt")
        record("end", self.label)


class CancelledJob(Job):
    """Raises `CancelJob`, which fails it at once although attempts remain."""

    max_attempts = 3

    def __init__(self, label: str) -> None:
        self.label = label

    async def run(self) -> None:
        record("start", self.label)
        raise CancelJob(f"CancelledJob {self.label} cancels itself")


class FailOnJob(Job):
    """Raises `ValueError`, listed in `fail_on`, so it fails at once although attempts remain."""

    max_attempts = 3
    fail_on = (ValueError,)

    def __init__(self, label: str) -> None:
        self.label = label

    async def run(self) -> None:
        record("start", self.label)
        raise ValueError(f"FailOnJob {self.label} raises a fail_on error")


class PoisonJob(Job):
    """Kills the worker that runs it with SIGKILL, every time."""

    def __init__(self, label: str) -> None:
        self.label = label

    async def run(self) -> None:
        record("start", self.label)
        os.kill(os.getpid(), signal.SIGKILL)


class AsyncTimeoutJob(Job):
    """An async job that outlives its 0.5 s timeout; it records its cancellation."""

    timeout_s = 0.5
    max_attempts = 2
    backoff_base_s = 0.1

    def __init__(self, label: str) -> None:
        self.label = label

    async def run(self) -> None:
        record("start", self.label)
        try:
            await asyncio.sleep(30.0)
        except asyncio.CancelledError:
            record("cancelled", self.label)
            raise
        record("end", self.label)


class ProcessTimeoutJob(Job):
    """A sync job in a child process that outlives its 1 s timeout; it records the child's pid."""

    run_in_process = True
    timeout_s = 1.0
    max_attempts = 1

    def __init__(self, label: str) -> None:
        self.label = label

    def run(self) -> None:
        record("start", self.label)
        time.sleep(30.0)
        record("end", self.label)


class ThreadTimeoutJob(Job):
    """A sync job in a worker thread that outlives its 0.5 s timeout by `seconds`."""

    timeout_s = 0.5
    max_attempts = 1

    def __init__(self, label: str, seconds: float) -> None:
        self.label = label
        self.seconds = seconds

    def run(self) -> None:
        record("start", self.label)
        time.sleep(self.seconds)
        record("end", self.label)


class QuickThreadJob(Job):
    """A sync job with a 1 s timeout that takes no time; it records its start and end."""

    timeout_s = 1.0
    max_attempts = 1

    def __init__(self, label: str) -> None:
        self.label = label

    def run(self) -> None:
        record("start", self.label)
        record("end", self.label)
