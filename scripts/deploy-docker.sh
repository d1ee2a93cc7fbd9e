#!/usr/bin/env bash
# Docker deployment on one host (docker/compose.yaml): credentials, images, the TLS SuperLink with
# SuperNode authentication, registration of every SuperNode key, the SuperNodes (one GPU each),
# then one run. Usage:
#   bash scripts/deploy-docker.sh [RUN_CONFIG]      # default RUN_CONFIG: preset="ci"
#   bash scripts/deploy-docker.sh down              # stop (volumes are kept)
# Environment: CPU_ONLY=1 (compose.cpu.yaml: CPU images, no GPU reservation),
#   SUPERLINK_SAN=<host name or IP,...> (extra names in the SuperLink certificate, for remote
#   SuperNodes), SUPERNODE_<i>_GPU=<device id>, SUPERLINK_PORT (host port, 8000).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/docker"
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

# 1. TLS certificates + SuperNode keys (kept if present)
sans="superlink,localhost,127.0.0.1${SUPERLINK_SAN:+,$SUPERLINK_SAN}"
cred_args=(--out credentials --supernodes "$n" --san "$sans")
if python3 -c 'import cryptography' 2>/dev/null; then
  python3 credentials.py "${cred_args[@]}"
elif [ -x "$root/.venv/bin/python" ]; then
  "$root/.venv/bin/python" credentials.py "${cred_args[@]}"
else  # no local Python with `cryptography`: use the SuperLink image
  "${compose[@]}" build superlink
  docker run --rm -v "$PWD:/out" -w /out --entrypoint python fedsoft-superlink:cpu \
    /app/docker/credentials.py "${cred_args[@]}"
fi

# 2. images, SuperLink (waits for its health check)
"${compose[@]}" build
"${compose[@]}" up -d --wait superlink

# 3. register each SuperNode's public key (already registered keys are reported and skipped)
for node in "${nodes[@]}"; do
  "${compose[@]}" run --rm cli supernode register "/keys/${node}.pub" docker \
    || echo "[deploy-docker] ${node}: not registered (already registered?)"
done

# 4. SuperNodes, wait until all are online
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
