#!/usr/bin/env bash
# Install what the tests need, then lint and run the test suite.
#
#   bash .ci/test.sh [PYTEST ARGS...]
#
# It installs Debian's redis-server when none is on the machine (with sudo when not root),
# creates .venv with spark_bg and its test tools, runs .ci/lint.sh, then pytest. The tests
# start their own redis-server on a free loopback port; they never use a Redis already running.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    echo "installing redis-server from Debian's package"
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    # The package starts a service on port 6379; the tests do not use it.
fi

PYTHON_BIN=${PYTHON_BIN:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON_BIN" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"

bash .ci/lint.sh
.venv/bin/python -m pytest "$@"
