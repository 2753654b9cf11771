#!/usr/bin/env bash
# Lint, format check and strict typing; the same script runs locally and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m ruff check spark_bg tests examples bench
"$PYTHON" -m ruff format --check spark_bg tests examples bench
"$PYTHON" -m mypy spark_bg
