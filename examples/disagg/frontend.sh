#!/usr/bin/env bash
# The OpenAI-compatible HTTP frontend. By default it runs the processor in-process and workers connect
# to it; with ZDYN_PROCESSORS_ENDPOINT set, separate processors register there instead.
# Extra flags are passed on: ./frontend.sh --port 8080
here=$(dirname "$0")
exec zdyn frontend -f "${ZDYN_CONFIG:-$here/config.yaml}" \
    ${ZDYN_MODEL:+--model "$ZDYN_MODEL"} \
    ${ZDYN_PORT:+--port "$ZDYN_PORT"} \
    ${ZDYN_BIND_HOST:+--host "$ZDYN_BIND_HOST"} \
    ${ZDYN_WORKERS_ENDPOINT:+--workers-endpoint "$ZDYN_WORKERS_ENDPOINT"} \
    ${ZDYN_PROCESSORS_ENDPOINT:+--processors-endpoint "$ZDYN_PROCESSORS_ENDPOINT"} \
    "$@"
