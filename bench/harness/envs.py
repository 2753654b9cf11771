"""Virtual environments: one per peer group under bench/.venvs/, plus the project's own .venv.

The latest peers cannot share one redis-py (arq 0.28 needs redis-py < 6, SAQ 0.26's redis extra
< 8, taskiq-redis 1.2.4 >= 8, Celery 5.7 >= 6.4), so each peer gets its own environment. An
environment is created only when it is missing or when its requirement list changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
VENVS_DIR = BENCH_DIR / ".venvs"
PROJECT_ENV = "project"
PROJECT_VENV = REPO_DIR / ".venv"

# hiredis goes into every peer environment because the project's environment has it too, and
# redis-py uses it for parsing replies whenever it is installed.
REQUIREMENTS: dict[str, list[str]] = {
    "rq": ["rq==3.0.0", "hiredis"],
    "arq": ["arq==0.28.0", "redis[hiredis]<6"],
    # SAQ 0.26.4 imports typing_extensions without declaring it.
    "saq": ["saq[redis]==0.26.4", "typing_extensions", "hiredis"],
    "dramatiq": ["dramatiq[redis]==2.2.1", "hiredis"],
    "celery": ["celery[redis]==5.7.0", "hiredis"],
    "huey": ["huey==3.5.4", "redis", "hiredis"],
    "taskiq": ["taskiq==0.13.0", "taskiq-redis==1.2.4", "hiredis"],
    "plot": ["matplotlib"],
}

# Distributions whose versions the report lists for each environment.
REPORTED_DISTRIBUTIONS = [
    "spark_bg",
    "rq",
    "arq",
    "saq",
    "dramatiq",
    "celery",
    "kombu",
    "huey",
    "taskiq",
    "taskiq-redis",
    "redis",
    "hiredis",
    "starlette",
    "uvicorn",
    "matplotlib",
]

MARKER = ".bench-requirements.json"


def python_path(env: str) -> Path:
    """Return the interpreter of environment ``env``."""
    if env == PROJECT_ENV:
        return PROJECT_VENV / "bin" / "python"
    return VENVS_DIR / env / "bin" / "python"


def _is_current(env: str) -> bool:
    marker = VENVS_DIR / env / MARKER
    if not python_path(env).exists() or not marker.exists():
        return False
    return json.loads(marker.read_text()) == REQUIREMENTS[env]


def ensure_env(env: str, log: callable) -> None:
    """Create environment ``env`` and install its requirements unless it is current.

    Raises RuntimeError when venv creation or pip fails.
    """
    if env == PROJECT_ENV:
        if not python_path(env).exists():
            raise RuntimeError(
                f"project environment {PROJECT_VENV} is missing: create it and "
                f"run 'pip install -e {REPO_DIR}' in it"
            )
        return
    if _is_current(env):
        return
    target = VENVS_DIR / env
    if target.exists():
        shutil.rmtree(target)
    log(f"creating {target} with {' '.join(REQUIREMENTS[env])}")
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=300)
    completed = subprocess.run(
        [
            str(python_path(env)),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *REQUIREMENTS[env],
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"pip install into {target} failed: {completed.stderr.strip()[-2000:]}")
    (target / MARKER).write_text(json.dumps(REQUIREMENTS[env]))


def installed_versions(env: str) -> dict[str, str]:
    """Return the versions of the reported distributions installed in ``env``."""
    script = (
        "import importlib.metadata as m, json, sys\n"
        "found = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        found[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(found))\n"
    )
    completed = subprocess.run(
        [str(python_path(env)), "-c", script, *REPORTED_DISTRIBUTIONS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if completed.returncode != 0:
        return {}
    return json.loads(completed.stdout)


def env_vars(env_name: str, redis_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a case process in ``env_name``.

    bench/ is on PYTHONPATH everywhere, and the repository too in the project environment, so
    spark_bg imports from the work tree even when it is not installed there.
    """
    env = dict(os.environ)
    for name in ("VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    paths = [str(BENCH_DIR)] + ([str(REPO_DIR)] if env_name == PROJECT_ENV else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["BENCH_REDIS_URL"] = redis_url
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env
