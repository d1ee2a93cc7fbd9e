#!/usr/bin/env bash
# Set up, then run the embedded offline default with `flwr run .` on 4 simulated SuperNodes.
# Extra arguments go to `flwr run` (e.g. --run-config 'preset="ci"').
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
bash scripts/stop-local-superlink.sh
trap 'bash scripts/stop-local-superlink.sh' EXIT
flwr run . --federation-config "num-supernodes=${NUM_SUPERNODES:-4}" --stream "$@"
