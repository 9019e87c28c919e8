#!/usr/bin/env bash
# Set up, lint, and run the test suite. Extra arguments go to pytest, e.g. scripts/test.sh -k wire.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
scripts/browser.sh  # a Chromium for the dashboard's browser tests, where one can be installed
.venv/bin/ruff check gossipfl tests benchmarks examples
.venv/bin/ruff format --check gossipfl tests benchmarks examples
.venv/bin/lint-imports --no-cache  # the layers contract in pyproject.toml (docs/architecture.md)
# two workers (GOSSIPFL_TEST_WORKERS; 0: one process): most tests wait on sockets, timers and child processes,
# so two share a 2-core machine well (the suite: 393 s instead of 616 s there)
workers="${GOSSIPFL_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "$workers" "$@"
