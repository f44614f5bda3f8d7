#!/usr/bin/env bash
# A worker (vLLM, or the mocker with ZDYN_ENGINE=mocker) serving the processor and registered with the
# router (ZDYN_CONNECT, comma-separated). It publishes vLLM's KV-cache events on a free port (or
# --kv-events-port P) and announces it at READY. Every vLLM engine argument can be added.
here=$(dirname "$0")
exec zdyn worker -f "${ZDYN_CONFIG:-$here/config.yaml}" \
    ${ZDYN_MODEL:+--model "$ZDYN_MODEL"} \
    ${ZDYN_ENGINE:+--engine "$ZDYN_ENGINE"} \
    ${ZDYN_CONNECT:+--connect "$ZDYN_CONNECT"} \
    "$@"
