#!/usr/bin/env bash
# Install fl2ora and run the quickstart: FL²oRA on real CIFAR-10 images with a tiny
# random-initialised CLIP (a pipeline check of a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/fl2ora run configs/quickstart.yaml --output "runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
