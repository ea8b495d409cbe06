#!/usr/bin/env bash
# Install fl2ora with the flower extra, then run the quickstart on a local Flower
# federation over TLS: one SuperLink and one SuperNode per client, all on 127.0.0.1.
# Extra arguments go to `fl2ora flower`, e.g. --round-timeout 120 or --set federated.rounds=2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pip install --quiet -e ".[flower]"
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec .venv/bin/fl2ora flower configs/quickstart.yaml \
    --set partition.num_clients=3 --set federated.fraction=1.0 \
    --output "runs/quickstart-flower-$(date +%Y%m%d-%H%M%S)" "$@"
