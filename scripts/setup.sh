#!/usr/bin/env bash
# Creates .venv (or $SIMPLETUNER_VENV) and installs SimpleTuner with the extras given as arguments.
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so that pip does not
# pull a multi-gigabyte CUDA build; on a CUDA machine pip picks the usual CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SIMPLETUNER_VENV:-.venv}"
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
"${pip[@]}" -e "$target"
echo "installed SimpleTuner into $venv (extras: ${extras:-none})" >&2
