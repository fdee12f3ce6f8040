#!/usr/bin/env bash
# Start a local Prefect server (SQLite, loopback only) and a process worker, and deploy the
# flows of prefect.yaml, so that `prefect deployment run wrangle/entity-matching` works.
# State lives in .prefect/ (PREFECT_HOME); logs and pids in .prefect/serve/.
# Stop with scripts/stop_serve.sh. Environment: PREFECT_PORT (default 4200), PYTHON_BIN_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${PYTHON_BIN_DIR:-$ROOT/.venv/bin}"
PORT="${PREFECT_PORT:-4200}"

export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1
export GX_ANALYTICS_ENABLED=False
export HF_HUB_OFFLINE=1
export FLEXWRANGLE_DIR="$ROOT"   # the deployments' working directory (prefect.yaml pull step)

STATE="$PREFECT_HOME/serve"
mkdir -p "$STATE"

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$STATE/server.pid" || alive "$STATE/worker.pid"; then
    echo "already running (pids in $STATE); stop it with scripts/stop_serve.sh" >&2
    exit 1
fi

echo "starting the Prefect server on $PREFECT_API_URL (log: $STATE/server.log)"
# setsid: the server gets its own process group, so stop_serve.sh can end all of it.
setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 &
echo $! >"$STATE/server.pid"

"$BIN/python" - "$PREFECT_API_URL/health" <<'PY'
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + 180
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"the Prefect server did not answer {url} within 180 s")
    time.sleep(1)
PY
echo "server healthy"

if ! "$BIN/prefect" work-pool inspect local-process >/dev/null 2>&1; then
    "$BIN/prefect" work-pool create local-process --type process
fi
"$BIN/prefect" --no-prompt deploy --all

echo "starting a worker on pool local-process (log: $STATE/worker.log)"
setsid "$BIN/prefect" worker start --pool local-process >"$STATE/worker.log" 2>&1 &
echo $! >"$STATE/worker.pid"

cat <<MSG

Prefect is serving at http://127.0.0.1:${PORT} (pids in $STATE).
  export PREFECT_API_URL=$PREFECT_API_URL PREFECT_HOME=$PREFECT_HOME
  prefect deployment run load-benchmarks/benchmarks --watch     # once: benchmark tables
  prefect deployment run wrangle/entity-matching --watch
Stop with scripts/stop_serve.sh
MSG
