#!/usr/bin/env bash
# Lint, format check and strict typing; the same script runs locally and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
paths=()
for path in spark_bg tests examples bench; do
    if [ -e "$path" ]; then paths+=("$path"); fi
done
"$PYTHON" -m ruff check "${paths[@]}"
"$PYTHON" -m ruff format --check "${paths[@]}"
"$PYTHON" -m mypy spark_bg
