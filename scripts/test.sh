#!/usr/bin/env bash
# Sets everything up and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${SIMPLETUNER_VENV:-.venv}/bin/python" -m pytest -n "${SIMPLETUNER_TEST_WORKERS:-2}" "$@"
