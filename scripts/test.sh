#!/usr/bin/env bash
# Set up, then run the whole test suite (unit, property and end-to-end through Flower).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
ruff check .
python -m pytest -q "$@"
