#!/usr/bin/env bash
# Sets everything up and runs the demo: a tiny LoRA trained on generated images, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh tensorboard
exec "${SIMPLETUNER_VENV:-.venv}/bin/simpletuner" demo "$@"
