#!/usr/bin/env bash
# Stop what scripts/serve.sh started: the worker first, then the server.
#
# Worker: Prefect turns a first SIGTERM into a graceful SIGINT (stop polling, let running flow
# runs finish), which in Prefect 3.8 can hang for minutes; a second SIGTERM makes the worker
# SIGKILL itself. So: SIGTERM, up to 10 s grace, SIGTERM again, then SIGKILL as a last resort,
# and finally anything left in its process group (flow runs it started). A flow run cut short
# this way resumes where it stopped when run again with the same parameters.
# Server: one SIGTERM to its process group.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${PREFECT_HOME:-$ROOT/.prefect}/serve"

wait_gone() {  # wait_gone <pid> <seconds>: 0 once the pid is gone
    local i
    for ((i = 0; i < $2 * 2; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.5
    done
    ! kill -0 "$1" 2>/dev/null
}

stop() {  # stop <name> <grace seconds> <signals...>
    local name="$1" grace="$2" pidfile="$STATE/$1.pid" pid sig
    shift 2
    if [[ ! -f "$pidfile" ]] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "$name: not running"; rm -f "$pidfile"; return 0
    fi
    pid="$(cat "$pidfile")"
    for sig in "$@"; do
        kill "-$sig" "$pid" 2>/dev/null
        wait_gone "$pid" "$grace" && break
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$name: still running, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        wait_gone "$pid" 5
    fi
    kill -TERM -- "-$pid" 2>/dev/null  # leftovers of its process group (setsid in serve.sh)
    rm -f "$pidfile"
    echo "$name: stopped"
}

stop worker 10 TERM TERM
stop server 30 TERM
