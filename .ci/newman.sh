#!/usr/bin/env bash
# Runs the Postman collection with newman (npm) against `payment-service run`, as a client would:
# the service starts on a free 127.0.0.1 port with its own temporary data directory (embedded
# PostgreSQL), the collection runs twice against the same database (reruns must pass), then the
# service is stopped by its PID (SIGINT, as Ctrl-C). Needs `make install` first, plus node and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=.venv/bin/python
COLLECTION="postman/Payment Service - Local.postman_collection.json"
ENVIRONMENT="postman/Payment Service - Local.postman_environment.json"
NEWMAN_VERSION="${NEWMAN_VERSION:-6}"
NEWMAN_PREFIX="${NEWMAN_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/payment-service/newman-$NEWMAN_VERSION}"
READY_SECONDS=180   # a first embedded PostgreSQL initialises its cluster
STOP_SECONDS=30

newman="$NEWMAN_PREFIX/node_modules/.bin/newman"
if [ ! -x "$newman" ]; then
    echo "== newman: installing newman@$NEWMAN_VERSION from the npm registry into $NEWMAN_PREFIX"
    mkdir -p "$NEWMAN_PREFIX"
    npm install --prefix "$NEWMAN_PREFIX" --no-audit --no-fund --loglevel=error \
        "newman@$NEWMAN_VERSION" >/dev/null
fi
echo "== newman $("$newman" --version)"

work="$(mktemp -d)"
free_port() { "$PYTHON" -c 'from payment_service.embedded import free_port; print(free_port())'; }
port="$(free_port)"
metrics_port="$(free_port)"

# The admin API (the collection's folder Admin) with a key of this run only.
admin_key="newman-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')"

# The relay delivers to a port where nothing listens; it only retries in the background.
env -u DATABASE_URL -u DB_HOST -u API_KEYS -u API_PREFIX \
    ADMIN_API_KEYS="newman:$admin_key" \
    PAYMENT_SERVICE_DATA_DIR="$work/data" SERVICE_PORT="$port" RELAY_METRICS_PORT="$metrics_port" \
    NOTIFICATION_SERVICE_URL="http://127.0.0.1:$(free_port)" LOG_LEVEL=WARNING \
    .venv/bin/payment-service run >"$work/service.log" 2>&1 &
pid=$!

stop_service() {
    if kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid"
        for _ in $(seq $((STOP_SECONDS * 10))); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "== newman: payment-service run (pid $pid) did not stop; SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            pidfile="$work/data/postgres/postmaster.pid"
            [ -f "$pidfile" ] && kill -QUIT "$(head -1 "$pidfile")" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap stop_service EXIT

"$PYTHON" - "$port" "$pid" "$READY_SECONDS" <<'EOF' || { tail -n 40 "$work/service.log"; exit 1; }
import os, sys, time, urllib.request

port, pid, ready = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + ready
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("payment-service run exited before it answered /health")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(f"payment-service run did not answer /health within {ready} s")
EOF

echo "== newman: the collection, twice, against payment-service run on 127.0.0.1:$port"
"$newman" run "$COLLECTION" --environment "$ENVIRONMENT" \
    --env-var "base_url=http://127.0.0.1:$port" --env-var "adminKey=$admin_key" \
    --iteration-count 2 \
    --timeout-request 10000 --color off --reporters cli
