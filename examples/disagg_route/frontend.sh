#!/usr/bin/env bash
# The OpenAI-compatible HTTP frontend with its processor, asking the KV router (router.sh) where each
# request goes. Extra flags are passed on: ./frontend.sh --port 8080 --router-timeout 0.1
here=$(dirname "$0")
exec zdyn frontend -f "${ZDYN_CONFIG:-$here/config.yaml}" \
    ${ZDYN_MODEL:+--model "$ZDYN_MODEL"} \
    ${ZDYN_PORT:+--port "$ZDYN_PORT"} \
    ${ZDYN_BIND_HOST:+--host "$ZDYN_BIND_HOST"} \
    ${ZDYN_WORKERS_ENDPOINT:+--workers-endpoint "$ZDYN_WORKERS_ENDPOINT"} \
    ${ZDYN_ROUTER_ENDPOINT:+--router-endpoint "$ZDYN_ROUTER_ENDPOINT"} \
    "$@"
