#!/usr/bin/env bash
# Set up, then run the embedded offline default with `flwr run .` on 4 simulated SuperNodes.
# Extra arguments go to `flwr run` (e.g. --run-config 'preset="ci"').
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
bash scripts/stop-local-superlink.sh
log="$(mktemp "${TMPDIR:-/tmp}/fedsoft-quickstart.XXXXXX")"
trap 'bash scripts/stop-local-superlink.sh; rm -f "$log"' EXIT
flwr run . --federation-config "num-supernodes=${NUM_SUPERNODES:-4}" --stream "$@" 2>&1 \
  | tee "$log"
# flwr run exits 0 even when the ServerApp fails: the run's own last line says it finished
if ! grep -Eq '\[fedsoft\] done: ([0-9]+)/\1 rounds' "$log"; then
  echo "[fedsoft] the run did not finish all its rounds (see its output above)" >&2
  exit 1
fi
