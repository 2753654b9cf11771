"""Process helpers: find a process's descendants, stop a process tree by pid, read its RSS.

Everything here addresses processes by pid, and only processes that this benchmark started or
their descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return data[data.rindex(")") + 2 :].split()


def _identity(pid: int) -> tuple[int, str] | None:
    """Return (pid, start time in clock ticks), which stays unique even if the pid is reused."""
    fields = _stat_fields(pid)
    return None if fields is None else (pid, fields[19])


def descendants(pid: int) -> list[int]:
    """Return the pids of all live descendants of ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def tree_rss_kib(pid: int) -> int:
    """Return the summed VmRSS, in KiB, of ``pid`` and its descendants."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{member}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def stop_tree(process: subprocess.Popen, grace: float = 10.0) -> int | None:
    """Stop ``process`` and its descendants: SIGTERM to the root, then SIGKILL to what is left.

    Returns the root's exit code, or None if it had to be killed.
    """
    members = [ident for ident in map(_identity, [process.pid, *descendants(process.pid)]) if ident]
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        code: int | None = process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        code = None
    deadline = time.monotonic() + 2.0
    for pid, started in members:
        while _identity(pid) == (pid, started) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _identity(pid) == (pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if code is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    return code


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections; raise TimeoutError or RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process {process.pid} exited with code {process.returncode} "
                f"before port {port} opened"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not accept connections within {timeout} s")
