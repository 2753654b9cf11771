"""Run a sync job in a child process that is killed when its timeout passes.

A thread cannot be stopped from outside in Python, so a sync job that must not outlive its
timeout runs in a child started by a `forkserver` (a clean process forked before any worker
thread exists). At the deadline the child gets SIGKILL and the attempt fails with
`TimeoutError`. An exception in the child comes back as `ChildJobError` carrying its traceback.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import traceback
from typing import Any

from spark_bg.errors import SparkError

__all__ = ["ChildJobError", "run_in_child"]

_context: Any = None


class ChildJobError(SparkError):
    """A job run in a child process raised; the message is the child's traceback."""


def _get_context() -> Any:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
    return _context


def _child_main(payload: bytes, packages: tuple[str, ...], pipe: Any) -> None:
    from spark_bg.job import JobLoader, parse_envelope

    try:
        envelope = parse_envelope(payload)
        module = envelope["class"].partition(":")[0]
        job = JobLoader((*packages, module)).rebuild(envelope)
        job.run()
    except BaseException:
        pipe.send(traceback.format_exc())
        raise SystemExit(1) from None
    pipe.send(None)


async def run_in_child(payload: bytes, packages: tuple[str, ...], timeout_s: float | None) -> None:
    """Run the job stored in `payload` in a child process, killed after `timeout_s`."""
    context = _get_context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_child_main, args=(payload, packages, sender), name="spark-job", daemon=True
    )
    process.start()
    sender.close()
    try:
        ready = await asyncio.to_thread(_wait_readable, receiver, timeout_s)
        if not ready:
            process.kill()
            raise TimeoutError(f"timed out after {timeout_s} s; the child process was killed")
        try:
            outcome = receiver.recv()
        except EOFError:
            outcome = f"the child process exited with code {process.exitcode} before reporting"
        if outcome is not None:
            raise ChildJobError(outcome)
    except asyncio.CancelledError:
        process.kill()
        raise
    finally:
        receiver.close()
        await asyncio.to_thread(process.join, 5.0)
        if process.is_alive():
            process.kill()


def _wait_readable(receiver: Any, timeout_s: float | None) -> bool:
    return bool(multiprocessing.connection.wait([receiver], timeout_s))
