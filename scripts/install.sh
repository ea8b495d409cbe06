#!/usr/bin/env bash
# Create .venv (once) and install fl2ora into it. Usage: bash scripts/install.sh [--test]
# torch and torchvision are pinned here, not in the package: 2.14.1 / 0.29.1 are the
# releases this project is tested with (a CUDA build that also runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
extras=""
if [ "${1:-}" = "--test" ]; then
    extras="[test,flower]"
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" -e ".${extras}"
