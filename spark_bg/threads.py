"""A pool of threads for sync jobs that reports finished jobs to the event loop in batches.

`loop.run_in_executor` wakes the event loop once per finished job. With many short sync jobs
those wake-ups cost more than the jobs, so here a thread that finishes a job while an earlier
report is still pending adds to that report instead of sending another.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["JobThreads"]

_Outcome = tuple[asyncio.Future[Any], bool, Any]
_Submitted = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class JobThreads:
    """`size` daemon threads running callables submitted from one event loop."""

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._submitted: queue.SimpleQueue[_Submitted | None]
        self._submitted = queue.SimpleQueue()
        self._finished: list[_Outcome] = []
        self._report_pending = False
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"spark-job-{index}", daemon=True)
            for index in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run `function(*args)` in a thread and return a future for its result or exception."""
        future: asyncio.Future[Any] = self.loop.create_future()
        self._submitted.put((future, function, args))
        return future

    def shutdown(self) -> None:
        """Let each thread exit once it finishes what it runs; queued callables are dropped."""
        while True:
            try:
                item = self._submitted.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.loop.call_soon_threadsafe(item[0].cancel)
        for _ in self._threads:
            self._submitted.put(None)

    def _work(self) -> None:
        while True:
            item = self._submitted.get()
            if item is None:
                return
            future, function, args = item
            try:
                outcome: _Outcome = (future, True, function(*args))
            except BaseException as exc:  # the awaiting job task handles it
                outcome = (future, False, exc)
            with self._lock:
                self._finished.append(outcome)
                if self._report_pending:
                    continue
                self._report_pending = True
            try:
                self.loop.call_soon_threadsafe(self._report)
            except RuntimeError:
                return  # The loop is closed, so no task awaits the outcome any more.

    def _report(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._report_pending = False
        for future, succeeded, value in finished:
            if future.done():
                continue
            if succeeded:
                future.set_result(value)
            else:
                future.set_exception(value)
