#!/usr/bin/env bash
# Stop the detached local SuperLink that `flwr run` started for this FLWR_HOME (it outlives the run).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${FLWR_HOME:-$root/.flwr-home}"
for pid in $(pgrep -f "flower-superlink.*${home}" || true); do
  kill "$pid" 2>/dev/null || true
done
