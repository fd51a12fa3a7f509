#!/usr/bin/env bash
# Creates .venv (or $SIMPLETUNER_VENV) and installs SimpleTuner with the extras given as arguments.
# On a machine without an NVIDIA GPU (no nvidia-smi) and without torch, it first installs torch==2.13.0
# from PyTorch's CPU wheel index (download.pytorch.org/whl/cpu). When that index cannot be reached it
# says so and installs torch==2.13.0 from pip's configured index instead: on Linux, PyPI's wheel is the
# CUDA build (about 5.5 GB installed; it runs on CPU too). On a CUDA machine pip picks the usual CUDA
# build. The last line printed names the torch build installed.
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
  cpu_index="https://download.pytorch.org/whl/cpu"
  if ! "${pip[@]}" --retries 1 --timeout 20 --index-url "$cpu_index" "torch==2.13.0"; then
    echo "note: $cpu_index could not be reached; installing torch==2.13.0 from pip's configured index" \
         "instead (from PyPI on Linux that is the CUDA build, about 5.5 GB installed)" >&2
    "${pip[@]}" "torch==2.13.0"
  fi
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
"${pip[@]}" -e "$target"
echo "installed SimpleTuner into $venv (extras: ${extras:-none})" >&2
"$venv/bin/python" -c 'import torch; print(f"torch {torch.__version__}:", "CUDA build" if torch.version.cuda else "CPU build")' >&2
