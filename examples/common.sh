# Shared by the examples' run.sh scripts: start roles in the background, wait until the frontend reports
# enough live workers, and stop everything (each role's whole process group) on Ctrl-C or when one dies.
# shellcheck shell=bash

ZDYN_PORT=${ZDYN_PORT:-8000}
ZDYN_HOST=${ZDYN_HOST:-127.0.0.1}          # where run.sh reaches the frontend
ZDYN_START_TIMEOUT=${ZDYN_START_TIMEOUT:-900}
ZDYN_LOG_DIR=${ZDYN_LOG_DIR:-./logs/$(basename "$(dirname "$0")")-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$ZDYN_LOG_DIR"
# CURVE keys for every role (made on first start); ZDYN_KEYS_DIR= (empty) with ZDYN_INSECURE=1 runs without.
ZDYN_KEYS_DIR=${ZDYN_KEYS_DIR-$HOME/.config/zdyn/keys}
if [ -n "$ZDYN_KEYS_DIR" ]; then
    zdyn keys generate "$ZDYN_KEYS_DIR" >/dev/null
    export ZDYN_KEYS_DIR
fi
declare -A ZDYN_PIDS=()

start() {  # start NAME COMMAND...: run in its own session (process group), output to NAME.log
    local name=$1; shift
    setsid "$@" >"$ZDYN_LOG_DIR/$name.log" 2>&1 &
    ZDYN_PIDS[$name]=$!
    echo "started $name (pid $!, log $ZDYN_LOG_DIR/$name.log)"
}

stop_all() {
    trap - INT TERM EXIT
    [ ${#ZDYN_PIDS[@]} = 0 ] && return
    echo "stopping ${!ZDYN_PIDS[*]}"
    for pid in "${ZDYN_PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 150); do
        local alive=0
        for pid in "${ZDYN_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for pid in "${ZDYN_PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    echo "stopped"
}
trap 'stop_all; exit 0' INT TERM
trap stop_all EXIT

check_alive() {
    for name in "${!ZDYN_PIDS[@]}"; do
        if ! kill -0 "${ZDYN_PIDS[$name]}" 2>/dev/null; then
            # (without the leak report Triton's nanobind bindings print when a vLLM process exits)
            echo "$name exited; the end of its log:"
            grep -v -E '^(nanobind: |See https://nanobind| - (leaked|\.\.\. skipped))' "$ZDYN_LOG_DIR/$name.log" | tail -n 20
            return 1
        fi
    done
}

live_workers() {  # number of live workers the frontend's /health reports
    curl -sf "http://$ZDYN_HOST:$ZDYN_PORT/health" 2>/dev/null \
        | python3 -c 'import json,sys; print(sum(w.get("workers", 1) for w in json.load(sys.stdin)["workers"]))' \
        2>/dev/null || echo 0
}

wait_for_workers() {  # wait_for_workers N
    local want=$1 waited=0
    echo "waiting for $want worker(s) (a first vLLM start with the default model takes a minute or two)"
    while [ "$(live_workers)" -lt "$want" ]; do
        check_alive || exit 1
        sleep 1; waited=$((waited + 1))
        [ $((waited % 15)) = 0 ] && echo "  ... ${waited}s, $(live_workers)/$want workers live"
        if [ $waited -ge "$ZDYN_START_TIMEOUT" ]; then echo "gave up after ${waited}s"; exit 1; fi
    done
    echo "ready: $want worker(s) live behind http://$ZDYN_HOST:$ZDYN_PORT"
}

serve_until_stopped() {
    echo "Ctrl-C stops everything"
    while check_alive; do sleep 1; done
    exit 1
}
