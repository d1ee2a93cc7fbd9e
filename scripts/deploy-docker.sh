#!/usr/bin/env bash
# Docker deployment on one host (docker/compose.yaml): credentials, images, the TLS SuperLink with
# SuperNode authentication behind its two nginx gateways (public Fleet listener, admin listener on
# 127.0.0.1), registration of every SuperNode key, the SuperNodes (one GPU each), then one run.
# Usage:
#   bash scripts/deploy-docker.sh [RUN_CONFIG]      # default RUN_CONFIG: preset="ci"
#   bash scripts/deploy-docker.sh down              # stop (volumes are kept)
# Environment: CPU_ONLY=1 (compose.cpu.yaml: CPU images, no GPU reservation),
#   SUPERLINK_SAN=<host name or IP,...> (extra names in the server certificate, for remote
#   SuperNodes), SUPERNODE_<i>_GPU=<device id>, SUPERLINK_PORT (host port of the public Fleet
#   listener, 8000), CONTROL_PORT (host port of the admin listener on 127.0.0.1, 9093),
#   FEDSOFT_UID/FEDSOFT_GID (the non-root user every container runs as; default: the invoking
#   user, or SUDO_UID under sudo, or 10001 for plain root).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/docker"

# the containers' user: the owner of docker/credentials (keys 0600), docker/flwr-cli and runs/
if [ -z "${FEDSOFT_UID:-}" ]; then
  if [ "$(id -u)" != 0 ]; then
    FEDSOFT_UID="$(id -u)" FEDSOFT_GID="$(id -g)"
  elif [ -n "${SUDO_UID:-}" ] && [ "${SUDO_UID}" != 0 ]; then
    FEDSOFT_UID="$SUDO_UID" FEDSOFT_GID="${SUDO_GID:-$SUDO_UID}"
  else
    FEDSOFT_UID=10001 FEDSOFT_GID=10001
  fi
fi
export FEDSOFT_UID FEDSOFT_GID="${FEDSOFT_GID:-$FEDSOFT_UID}"
if [ "$FEDSOFT_UID" = 0 ]; then
  echo "[deploy-docker] FEDSOFT_UID=0: the containers must not run as root" >&2
  exit 1
fi
compose=(docker compose -f compose.yaml)
if [ "${CPU_ONLY:-0}" = 1 ]; then compose+=(-f compose.cpu.yaml); fi

if [ "${1:-}" = down ]; then
  exec "${compose[@]}" down
fi
run_config="${1:-preset=\"ci\"}"
mapfile -t nodes < <("${compose[@]}" config --services | grep '^supernode-' | sort)
n=${#nodes[@]}
export NUM_PARTITIONS="${NUM_PARTITIONS:-$n}"
[[ "$run_config" == *min-available-nodes* ]] || run_config="$run_config min-available-nodes=$n"
echo "[deploy-docker] ${n} SuperNodes: ${nodes[*]}"

echo "[deploy-docker] containers run as ${FEDSOFT_UID}:${FEDSOFT_GID}"
mkdir -p credentials "$root/runs"
if [ "$(id -u)" = 0 ]; then  # root: hand what the containers read and write to their user
  chown "$FEDSOFT_UID:$FEDSOFT_GID" credentials flwr-cli "$root/runs"
elif [ "$FEDSOFT_UID" != "$(id -u)" ]; then
  echo "[deploy-docker] warning: FEDSOFT_UID=$FEDSOFT_UID is not you ($(id -u)): it must own" \
       "docker/credentials, docker/flwr-cli and runs/" >&2
fi

# 1. TLS certificates + SuperNode keys (kept if present; a kept certificate must name the
#    gateways: otherwise stop and say so)
sans="superlink,gateway,gateway-admin,localhost,127.0.0.1${SUPERLINK_SAN:+,$SUPERLINK_SAN}"
cred_args=(--out credentials --supernodes "$n" --san "$sans" --strict)
if python3 -c 'import cryptography' 2>/dev/null; then
  python3 credentials.py "${cred_args[@]}"
elif [ -x "$root/.venv/bin/python" ]; then
  "$root/.venv/bin/python" credentials.py "${cred_args[@]}"
else  # no local Python with `cryptography`: use the SuperLink image
  "${compose[@]}" build superlink
  docker run --rm -v "$PWD:/out" -w /out --entrypoint python fedsoft-superlink:cpu \
    /app/docker/credentials.py "${cred_args[@]}"
fi
if [ "$(id -u)" = 0 ]; then
  chown -R "$FEDSOFT_UID:$FEDSOFT_GID" credentials
fi

# 2. images, SuperLink (waits for its health check) and the admin gateway
"${compose[@]}" build
"${compose[@]}" up -d --wait superlink gateway-admin

# 3. register each SuperNode's public key (already registered keys are reported and skipped)
for node in "${nodes[@]}"; do
  "${compose[@]}" run --rm cli supernode register "/keys/${node}.pub" docker \
    || echo "[deploy-docker] ${node}: not registered (already registered?)"
done

# 4. the public gateway and the SuperNodes, wait until all are online
"${compose[@]}" up -d
for _ in $(seq 60); do
  online=$("${compose[@]}" run --rm cli supernode list docker --format json 2>/dev/null \
           | grep -c '"status": "online"' || true)
  [ "$online" -ge "$n" ] && break
  sleep 5
done
echo "[deploy-docker] ${online}/${n} SuperNodes online"
[ "$online" -ge "$n" ] || { "${compose[@]}" logs --tail 50; exit 1; }

# 5. one run; results in runs/ (the SuperLink container's /workspace/runs)
"${compose[@]}" run --rm cli run /app docker --run-config "$run_config" --stream
"${compose[@]}" run --rm cli list docker
echo "[deploy-docker] federation still up: 'bash scripts/deploy-docker.sh down' stops it"
