"""Completion records that the benchmark jobs write, cheap enough to leave the jobs no-op.

A no-op job calls ``mark()``: it appends its end time (8 bytes, a little-endian double from
``time.time()``) to the file named by ``BENCH_RECORD``. Writes to a file opened with O_APPEND are
atomic on Linux, so worker processes, forked children and threads can share one file, and the
harness counts finished jobs from the file size alone.

A pickup-latency job calls ``pickup(t_push)`` first thing: it writes the push time and its own
start time (two doubles) to the FIFO named by ``BENCH_FIFO``, where the producer blocks in read().
"""

from __future__ import annotations

import os
import struct
import time

RECORD_ENV = "BENCH_RECORD"
FIFO_ENV = "BENCH_FIFO"

_MARK = struct.Struct("<d")
_PICKUP = struct.Struct("<dd")

_record_fd: int | None = None
_record_pid = 0
_fifo_fd: int | None = None
_fifo_pid = 0


def mark() -> None:
    """Append the current time to the completion record."""
    global _record_fd, _record_pid
    now = time.time()
    if _record_fd is None or _record_pid != os.getpid():
        _record_fd = os.open(os.environ[RECORD_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _record_pid = os.getpid()
    os.write(_record_fd, _MARK.pack(now))


def pickup(t_push: float) -> None:
    """Send the push time and the current time to the waiting producer."""
    global _fifo_fd, _fifo_pid
    now = time.time()
    if _fifo_fd is None or _fifo_pid != os.getpid():
        # The producer keeps the FIFO open for reading, so a non-blocking open for writing succeeds.
        _fifo_fd = os.open(os.environ[FIFO_ENV], os.O_WRONLY | os.O_NONBLOCK)
        _fifo_pid = os.getpid()
    os.write(_fifo_fd, _PICKUP.pack(t_push, now))


def count_marks(path: str) -> int:
    """Return the number of completion records in the file at ``path`` (0 if it is missing)."""
    try:
        return os.stat(path).st_size // _MARK.size
    except FileNotFoundError:
        return 0


def read_marks(path: str) -> list[float]:
    """Return every end time in the completion record at ``path``."""
    with open(path, "rb") as f:
        data = f.read()
    usable = len(data) - len(data) % _MARK.size
    return [value for (value,) in _MARK.iter_unpack(data[:usable])]


def unpack_pickup(data: bytes) -> tuple[float, float]:
    """Decode one FIFO message into (push time, start time)."""
    return _PICKUP.unpack(data)


PICKUP_SIZE = _PICKUP.size
