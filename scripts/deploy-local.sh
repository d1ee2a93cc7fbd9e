#!/usr/bin/env bash
# One command: TLS SuperLink (SuperNode auth on) + 2 authenticated SuperNodes on 127.0.0.1, each a
# separate process, then `flwr run . local-tls` on the "ci" preset; everything is stopped after.
# Options (see `bash scripts/deploy-local.sh --help`): --supernodes N, --run-config '...',
# --keep-running / --stop, --workdir DIR. Logs: .flwr-home/deploy-local/logs/.
# The SuperLink binds 127.0.0.1 only (it serves the Fleet, Control and Runtime APIs on one port,
# the Control API without user authentication). --gateway puts nginx in front of it
# (docker/gateway/*.conf.template): SuperNodes through its Fleet listener (--gateway-host,
# --fleet-port; 0.0.0.0 for SuperNodes on other machines, with --san <host name>), the flwr CLI
# through its admin listener on 127.0.0.1. Needs nginx (Debian/Ubuntu: apt-get install nginx-light).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[ -x .venv/bin/python ] || bash scripts/setup.sh
source scripts/env.sh
exec python scripts/deploy/local.py "$@"
