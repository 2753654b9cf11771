"""Run the hello example end to end: web app, worker, one request, then stop both.

    python3 examples/hello/demo.py

Run from the repository root with any Python 3.11+. The first run creates `.venv` and installs
spark_bg and uvicorn into it. The demo then starts `uvicorn examples.hello.app:app` and
`spark-worker examples.hello.app:app` on the embedded SQLite default (a file in a temporary
directory), sends GET /hello/John%20Doe, prints the worker's output until it greets John Doe,
and stops both processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import venv
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
VENV = REPOSITORY / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
GREETING = "Hello World John Doe!"
TIMEOUT_S = 60.0


def ensure_venv() -> None:
    """Re-run this script inside .venv, creating and filling it first when needed."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not VENV_PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    check = subprocess.run(
        [str(VENV_PYTHON), "-c", "import spark_bg, uvicorn"], capture_output=True, check=False
    )
    if check.returncode != 0:
        print("installing spark_bg and uvicorn into .venv", flush=True)
        subprocess.run(
            [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "-e", str(REPOSITORY), "uvicorn"],
            check=True,
        )
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo failed: {what} did not happen within {TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def main() -> None:
    ensure_venv()
    workdir = Path(tempfile.mkdtemp(prefix="spark_bg-demo-"))
    env = dict(os.environ)
    env.pop("SPARK_QUEUE_URL", None)  # use the SQLite default, spark_bg.sqlite3 in workdir
    env["PYTHONPATH"] = str(REPOSITORY)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HELLO_SLEEP_S", "2")
    port = free_port()
    web_log = workdir / "uvicorn.log"
    worker_log = workdir / "worker.log"
    print(f"working directory: {workdir}")
    with open(web_log, "wb") as web_out, open(worker_log, "wb") as worker_out:
        web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.hello.app:app", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=web_out,
            stderr=subprocess.STDOUT,
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "spark_bg", "examples.hello.app:app"],
            cwd=workdir,
            env=env,
            stdout=worker_out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: b"startup complete" in web_log.read_bytes(), "uvicorn startup")
            url = f"http://127.0.0.1:{port}/hello/John%20Doe"
            started = time.monotonic()
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read().decode()
            print(f"GET {url} -> {response.status} in {time.monotonic() - started:.3f} s: {body}")
            print(f"worker output (the job sleeps {env['HELLO_SLEEP_S']} s first):")
            wait_until(lambda: GREETING.encode() in worker_log.read_bytes(), "the greeting")
            time.sleep(0.2)  # lets the worker log the job as done, for the printout only
        finally:
            for process in (web, worker):
                process.send_signal(signal.SIGTERM)
            for process in (web, worker):
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        print(worker_log.read_text(), end="")
    # uvicorn ends by re-raising the SIGTERM it handled, so its exit status is -15.
    print(f"stopped uvicorn (status {web.returncode}), spark-worker (status {worker.returncode})")


if __name__ == "__main__":
    main()
