#!/usr/bin/env bash
# The project's test command: lint, type-check, then the test suite on a real mongod.
# Uses ./.venv when it exists (see README), else whatever is on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
ruff check .
ruff format --check .
mypy
# pytest exits 5 when it collected no tests: that is a failure here, as is any non-zero.
pytest "$@"
