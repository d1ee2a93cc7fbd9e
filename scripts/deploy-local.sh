#!/usr/bin/env bash
# One command: TLS SuperLink (SuperNode auth on) + 2 authenticated SuperNodes on 127.0.0.1, each a
# separate process, then `flwr run . local-tls` on the "ci" preset; everything is stopped after.
# Options (see `bash scripts/deploy-local.sh --help`): --supernodes N, --run-config '...',
# --keep-running / --stop, --workdir DIR. Logs: .flwr-home/deploy-local/logs/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[ -x .venv/bin/python ] || bash scripts/setup.sh
source scripts/env.sh
exec python scripts/deploy/local.py "$@"
