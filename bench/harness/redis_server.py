"""The benchmark's own redis-server on a free loopback port, and redis-benchmark against it."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

from harness import procs

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_BENCHMARK = "/usr/bin/redis-benchmark"


class RedisServer:
    """A redis-server that keeps nothing on disk, bound to 127.0.0.1 on a free port."""

    def __init__(self, log_path: Path) -> None:
        self.port = procs.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        argv = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--maxclients",
            "10000",
        ]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT
        )
        procs.wait_for_port(self.port, 10, self.process)
        self.version = self.command("INFO", "server").split("redis_version:")[1].split()[0]

    def command(self, *parts: str) -> str:
        """Send one command over RESP and return the reply as text (simple or bulk string)."""
        request = f"*{len(parts)}\r\n" + "".join(f"${len(p.encode())}\r\n{p}\r\n" for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(request.encode())
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                    break
                if data.startswith(b"$"):
                    header, _, rest = data.partition(b"\r\n")
                    if len(rest) >= int(header[1:]) + 2:
                        break
        if data.startswith(b"-"):
            raise RuntimeError(f"redis {parts[0]} failed: {data.decode(errors='replace').strip()}")
        text = data.decode(errors="replace")
        return text.split("\r\n", 1)[1] if text.startswith("$") else text[1:].strip()

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def stop(self) -> None:
        procs.stop_tree(self.process)
        self.log.close()


def run_redis_benchmark(port: int, requests: int, clients: int, pipeline: int) -> dict[str, float]:
    """Return requests/s of LPUSH and RPOP from redis-benchmark with the given load shape."""
    argv = [
        REDIS_BENCHMARK,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        "lpush,rpop",
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-P",
        str(pipeline),
        "--csv",
    ]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if completed.returncode != 0:
        raise RuntimeError(
            f"redis-benchmark exited with code {completed.returncode}: {completed.stderr.strip()}"
        )
    rates: dict[str, float] = {}
    for line in completed.stdout.splitlines():
        match = re.match(r'"(LPUSH|RPOP)[^"]*","([0-9.]+)"', line)
        if match:
            rates[match.group(1).lower()] = float(match.group(2))
    if set(rates) != {"lpush", "rpop"}:
        raise RuntimeError(
            f"could not read LPUSH and RPOP rates from redis-benchmark: {completed.stdout[-300:]!r}"
        )
    return rates
