"""Job classes that `spark-worker` runs in the end-to-end tests.

Every job appends one JSON line to `events.jsonl` in the directory named by
$SPARK_E2E_RESULTS, with its id from `spark_bg.current_job()`. Each line goes out in a single
`write()` on a file opened with O_APPEND, so on a local Linux filesystem lines from concurrent
jobs do not interleave. The test process reads the file to learn which jobs ran, how often and
in what order.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import spark_bg

RESULTS_ENV = "SPARK_E2E_RESULTS"
EVENTS_FILE = "events.jsonl"

BIG_STATE_INDEX = 7
"""Index of the sample state that carries a string of 200,000 characters."""


def record(event: dict[str, Any]) -> None:
    """Append `event`, with the running job's id and queue, as one line to the events file."""
    context = spark_bg.current_job()
    if context is None:
        raise RuntimeError("record() called with no job running: call it from a job's run()")
    line = {"id": context.id, "queue": context.queue, **event}
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    path = Path(os.environ[RESULTS_ENV]) / EVENTS_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, data)
    finally:
        os.close(descriptor)


def read_events(results_dir: Path) -> list[dict[str, Any]]:
    """Return the events recorded in `results_dir` so far, oldest first."""
    path = results_dir / EVENTS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


def sample_state(index: int) -> dict[str, Any]:
    """Return the job state pushed for `index`, with every type the encoding accepts, nested."""
    tokyo = dt.timezone(dt.timedelta(hours=9))
    state: dict[str, Any] = {
        "index": index,
        "text": f"Zoë 東京 🚀 #{index}",
        "nested": {
            "items": [index, -index, 0.1 * index, None, True, False, ""],
            "inner": {"depth": [[index], []], "empty": {}},
        },
        # A user dict shaped like an encoding tag must come back as a dict.
        "lookalike": {"$uuid": "not a tag"},
        "pair": (index, "tuple"),
        "when": dt.datetime(2024, 2, 29, 23, 59, 59, index, tzinfo=tokyo),
        "day": dt.date(2024, 1, 1) + dt.timedelta(days=index),
        "span": dt.timedelta(days=index, microseconds=5),
        "ident": uuid.UUID(int=index + 1),
        "amount": Decimal(f"{index}.10"),
        "raw": bytes([index % 256, 0, 255]),
        "huge": 2**70 + index,
    }
    if index == BIG_STATE_INDEX:
        state["big"] = "Zoë 東京 🚀 " * 20_000
    return state


def state_digest(state: dict[str, Any]) -> str:
    """Return the SHA-256 of `repr(state)`, which shows every value's type and key order."""
    return hashlib.sha256(repr(state).encode("utf-8")).hexdigest()


class MarkJob(spark_bg.Job):
    """Job that records its `label`, with one attempt so that a failure is final at once."""

    max_attempts = 1

    def __init__(self, label: str) -> None:
        self.label = label

    def run(self) -> None:
        record({"job": "mark", "label": self.label})


class SlowJob(spark_bg.Job):
    """Job that records "started", sleeps `sleep_s` seconds, then records "done" and the time."""

    max_attempts = 1

    def __init__(self, label: str, sleep_s: float) -> None:
        self.label = label
        self.sleep_s = sleep_s

    async def run(self) -> None:
        record({"job": "slow", "label": self.label, "event": "started", "at": time.time()})
        await asyncio.sleep(self.sleep_s)
        record({"job": "slow", "label": self.label, "event": "done", "at": time.time()})


class EchoStateJob(spark_bg.Job):
    """Job that records a digest of the state the worker rebuilt, to compare with the pushed one."""

    max_attempts = 1

    def __init__(self, **state: Any) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def run(self) -> None:
        state = vars(self)
        record(
            {
                "job": "echo",
                "index": state.get("index"),
                "digest": state_digest(state),
                "repr_head": repr(state)[:200],
            }
        )


class FailingJob(spark_bg.Job):
    """Job that raises `ValueError` on its one attempt."""

    max_attempts = 1

    def run(self) -> None:
        raise ValueError("FailingJob failed on purpose")


class PlainClass:
    """Class that is importable by name but is not a `spark_bg.Job`, so no worker may run it."""

    def run(self) -> None:
        raise AssertionError("PlainClass.run was called by the worker")
