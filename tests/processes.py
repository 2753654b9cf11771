"""Subprocesses for end-to-end tests: spark-worker and uvicorn, started and stopped by pid.

Each process writes its output to a file in the test's directory, which `output()` reads, so a
test can wait on a log line with a deadline and show the whole log when an assertion fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from tests.servers import free_port

REPOSITORY = Path(__file__).resolve().parent.parent


def wait_for(
    condition: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.05
) -> object:
    """Return the first true value of `condition()`, or raise `TimeoutError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


class Process:
    """A child process with its output in `log_path`."""

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path = REPOSITORY,
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPOSITORY), full_env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        full_env.update(env or {})
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        """Return everything the process printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_output(self, text: str, timeout_s: float = 15.0) -> None:
        """Wait until `text` appears in the output; fail with the output if it does not."""
        try:
            wait_for(lambda: text in self.output(), timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"{text!r} not printed within {timeout_s} s; output:\n{self.output()}"
            ) from None

    def signal(self, signum: int) -> None:
        """Send `signum` to the process, if it still runs."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def wait(self, timeout_s: float = 15.0) -> int:
        """Wait for the exit code; raise `subprocess.TimeoutExpired` past `timeout_s`."""
        return self.popen.wait(timeout_s)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then SIGKILL past `timeout_s`; return the exit code."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout_s)
        self._log.close()
        return self.popen.returncode


def start_worker(
    target: str,
    log_path: Path,
    *options: str,
    env: dict[str, str] | None = None,
    cwd: Path = REPOSITORY,
) -> Process:
    """Start `spark-worker TARGET OPTIONS` through `python -m spark_bg`."""
    return Process([sys.executable, "-m", "spark_bg", target, *options], log_path, env, cwd)


def uvicorn_command(target: str, port: int) -> list[str]:
    """Return the command that serves `target` with uvicorn on 127.0.0.1:`port`."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
    ]


def start_uvicorn(
    target: str, log_path: Path, env: dict[str, str] | None = None, cwd: Path = REPOSITORY
) -> tuple[Process, str]:
    """Start uvicorn serving `target` on a free loopback port; return it and its base URL."""
    port = free_port()
    process = Process(uvicorn_command(target, port), log_path, env, cwd)
    base_url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.popen.poll() is not None:
            raise AssertionError(f"uvicorn exited early; output:\n{process.output()}")
        try:
            httpx.get(base_url + "/", timeout=0.5)
        except httpx.TransportError:
            return False
        return True

    try:
        wait_for(answers, timeout_s=20.0)
    except BaseException:
        process.stop()
        raise
    return process, base_url
