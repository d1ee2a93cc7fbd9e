#!/usr/bin/env bash
# Set up, then run the whole test suite (unit, property and end-to-end through Flower).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# nginx for tests/test_gateway.py (the reverse proxy in front of the SuperLink): installed only if
# missing, on a machine with apt-get, as root (CI); anywhere else that test is skipped. Its
# service is not started (a temporary policy-rc.d, only if the machine has none).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] \
   && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[test] installing nginx for tests/test_gateway.py"
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
  fi
  apt_nginx() {  # Debian 12 / Ubuntu: nginx-light (smallest); newer Debian: nginx
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx
  }
  { apt_nginx || { apt-get update -qq && apt_nginx; }; } >/dev/null 2>&1 \
    || echo "[test] could not install nginx: tests/test_gateway.py will be skipped"
  [ -z "$policy" ] || rm -f "$policy"
fi
source scripts/env.sh
ruff check .
python -m pytest -q "$@"
