#!/usr/bin/env bash
# Sets everything up and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The run page's screenshot test renders it in headless Chromium: install it where apt can (as root);
# elsewhere that one test skips, saying why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }; } \
    || echo "chromium could not be installed; the run page's screenshot test will skip" >&2
fi
exec "${SIMPLETUNER_VENV:-.venv}/bin/python" -m pytest -n "${SIMPLETUNER_TEST_WORKERS:-2}" "$@"
