# Shared by the examples' run.sh scripts: start roles in the background, wait until the frontend reports
# enough live workers, restart a role that dies (with back-off; the others keep serving), and stop everything
# (each role's whole process group) on Ctrl-C.
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
ZDYN_RESTART_MAX_DELAY=${ZDYN_RESTART_MAX_DELAY:-30}  # seconds; a dead role waits 1, 2, 4, ... up to this
declare -A ZDYN_PIDS=() ZDYN_CMDS=() ZDYN_ENVS=() ZDYN_DELAY=() ZDYN_STARTED=()

start() {  # start NAME COMMAND...: run in its own session (process group), output to NAME.log
    local name=$1; shift
    ZDYN_CMDS[$name]=$(printf '%q ' "$@")
    # the ZDYN_* settings it was started with, so that a restart gets the same ones
    ZDYN_ENVS[$name]=$(env | { grep -E '^ZDYN_[A-Z0-9_]+=' || true; } \
        | while IFS= read -r kv; do printf '%q ' "$kv"; done)
    ZDYN_DELAY[$name]=1
    launch "$name"
}

launch() {  # launch NAME: (re)start a role recorded by start
    local name=$1
    (eval "exec env ${ZDYN_ENVS[$name]} setsid ${ZDYN_CMDS[$name]}") >>"$ZDYN_LOG_DIR/$name.log" 2>&1 &
    ZDYN_PIDS[$name]=$!
    ZDYN_STARTED[$name]=$SECONDS
    echo "started $name (pid $!, log $ZDYN_LOG_DIR/$name.log)"
}

stop_all() {
    trap - INT TERM EXIT
    [ ${#ZDYN_PIDS[@]} = 0 ] && return
    echo "stopping ${!ZDYN_PIDS[*]}"
    # SIGINT stops a role at once (SIGTERM would drain it: see "When things break" in the README)
    for pid in "${ZDYN_PIDS[@]}"; do [ "$pid" != 0 ] && kill -INT -- "-$pid" 2>/dev/null; done
    for _ in $(seq 150); do
        local alive=0
        for pid in "${ZDYN_PIDS[@]}"; do [ "$pid" != 0 ] && kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for pid in "${ZDYN_PIDS[@]}"; do [ "$pid" != 0 ] && kill -KILL -- "-$pid" 2>/dev/null; done
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

supervise() {  # restart each role that died, waiting longer after each quick death (1 s doubling to 30 s)
    local name pid code up
    for name in "${!ZDYN_PIDS[@]}"; do
        pid=${ZDYN_PIDS[$name]}
        [ "$pid" = 0 ] && continue
        kill -0 "$pid" 2>/dev/null && continue
        code=0; wait "$pid" 2>/dev/null || code=$?
        up=$((SECONDS - ZDYN_STARTED[$name]))
        [ $up -ge 60 ] && ZDYN_DELAY[$name]=1  # it had been running a while: start again quickly
        echo "$(date +%T) $name exited with code $code after ${up}s; restarting in ${ZDYN_DELAY[$name]}s" \
            "(the other roles keep serving; log $ZDYN_LOG_DIR/$name.log)"
        ZDYN_PIDS[$name]=0
        ZDYN_STARTED[$name]=$((SECONDS + ZDYN_DELAY[$name]))  # when to launch it again
        local next=$((ZDYN_DELAY[$name] * 2))
        ZDYN_DELAY[$name]=$((next > ZDYN_RESTART_MAX_DELAY ? ZDYN_RESTART_MAX_DELAY : next))
    done
    for name in "${!ZDYN_PIDS[@]}"; do
        if [ "${ZDYN_PIDS[$name]}" = 0 ] && [ "$SECONDS" -ge "${ZDYN_STARTED[$name]}" ]; then
            launch "$name"
        fi
    done
}

serve_until_stopped() {
    echo "Ctrl-C stops everything; a role that dies is restarted"
    while true; do supervise; sleep 1; done
}
