"""Real servers for the tests, started on free loopback ports and stopped by pid.

Tests never touch a server they did not start: each `RedisServer` runs its own redis-server
process on a port picked by the kernel, with persistence off and its files in a temp directory.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["REDIS_SERVER_EXECUTABLE", "RedisServer", "RedisServerError", "free_port"]

REDIS_SERVER_EXECUTABLE = "/usr/bin/redis-server"
LOOPBACK = "127.0.0.1"


class RedisServerError(RuntimeError):
    """A redis-server that failed to start, or a call that needs the server in another state."""


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago.

    The kernel picks the port for a socket bound to port 0. Another process can still take it
    before the caller binds it, so `RedisServer.start()` retries with a new port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A redis-server process owned by the tests, on 127.0.0.1 and a free port.

    It runs with no RDB snapshots and no AOF, so a plain `restart()` starts empty. Its log file
    and any dump file live in `directory`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        executable: str = REDIS_SERVER_EXECUTABLE,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.directory = Path(directory)
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self.host = LOOPBACK
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """File that redis-server writes its log to."""
        return self.directory / "redis-server.log"

    @property
    def stderr_path(self) -> Path:
        """File that receives redis-server's stderr, where it reports invalid settings."""
        return self.directory / "redis-server.stderr"

    @property
    def url(self) -> str:
        """Connection URL of database 0, such as `redis://127.0.0.1:40123/0`."""
        if self.port is None:
            raise RedisServerError("the Redis server has not been started, so it has no URL")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Process id of the running redis-server, or None when it is stopped."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the redis-server process is alive."""
        return self.pid is not None

    def client(self, **kwargs: object) -> redis.Redis:
        """Return a sync client of this server only. The caller closes it."""
        if self.port is None:
            raise RedisServerError("the Redis server has not been started, so it has no client")
        options: dict[str, object] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
        options.update(kwargs)
        return redis.Redis(host=self.host, port=self.port, db=0, **options)  # type: ignore[arg-type]

    def start(self, attempts: int = 3) -> None:
        """Start redis-server and wait until it replies to PING.

        Picks a free port on the first start and keeps it afterwards. Raises `RedisServerError`
        with the end of the server's log if the process exits or does not reply in time.
        """
        self._start(attempts, load_snapshot=False)

    def _start(self, attempts: int, *, load_snapshot: bool) -> None:
        if self.running:
            raise RedisServerError(f"the Redis server is already running with pid {self.pid}")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not load_snapshot:
            # redis-server loads dump.rdb from its directory at start, even with saving off.
            with contextlib.suppress(FileNotFoundError):
                (self.directory / "dump.rdb").unlink()
        keep_port = self.port is not None

        for attempt in range(1, attempts + 1):
            if not keep_port:
                self.port = free_port()
            try:
                self._launch()
                return
            except RedisServerError as exc:
                # Another process may have bound the free port between the probe and the start.
                port_taken = "Address already in use" in str(exc)
                if keep_port or not port_taken or attempt == attempts:
                    raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server by pid with SIGTERM, then SIGKILL after `timeout_s`, if it runs."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        self._process = None

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would, and reap it, if it runs."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10.0)
        self._process = None

    def restart(self, *, keep_data: bool = False) -> None:
        """Stop the server and start it again on the same port.

        With `keep_data`, the server writes a snapshot on shutdown and loads it on start, as a
        Redis with persistence would. Otherwise it starts empty.
        """
        if keep_data and self.running:
            with self.client() as client:
                client.shutdown(save=True)
            self._wait_exit()
        self.stop()
        self._start(attempts=1, load_snapshot=keep_data)

    def flush(self) -> None:
        """Delete every key of every database of this server."""
        with self.client() as client:
            client.flushall()

    def _launch(self) -> None:
        assert self.port is not None
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        # redis-server appends to its log file across restarts, so an error message shows only
        # the lines written after this launch.
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            with self.stderr_path.open("wb") as stderr_file:
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr_file,
                    cwd=self.directory,
                )
        except OSError as exc:
            raise RedisServerError(f"cannot run {self.executable}: {exc}") from exc

        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._process.poll() is not None:
                returncode = self._process.returncode
                self._process = None
                stderr = self.stderr_path.read_text(errors="replace").strip()
                raise RedisServerError(
                    f"redis-server on port {self.port} exited with code {returncode} at start; "
                    f"stderr: {stderr!r}; log:\n{self._read_log(log_offset)}"
                )
            if self._replies_to_ping():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(
                    f"redis-server on port {self.port} did not reply to PING within "
                    f"{self.start_timeout_s} s; log:\n{self._read_log(log_offset)}"
                )
            time.sleep(0.02)

    def _replies_to_ping(self) -> bool:
        assert self.port is not None
        client = redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False
        finally:
            client.close()

    def _wait_exit(self, timeout_s: float = 10.0) -> None:
        if self._process is not None:
            self._process.wait(timeout=timeout_s)

    def _read_log(self, offset: int, max_chars: int = 4000) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log file was written)"
        return text[-max_chars:]

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, pid={self.pid}, directory={str(self.directory)!r})"
