#!/usr/bin/env bash
# A decode worker: serves the processor and registers with the router (ZDYN_CONNECT); sends prompts with more than
# max-local-prefill-length uncached tokens to the prefill queue at ZDYN_PREFILL_QUEUE (when it has room).
here=$(dirname "$0")
exec zdyn worker -f "${ZDYN_CONFIG:-$here/config.yaml}" \
    ${ZDYN_MODEL:+--model "$ZDYN_MODEL"} \
    ${ZDYN_ENGINE:+--engine "$ZDYN_ENGINE"} \
    ${ZDYN_CONNECT:+--connect "$ZDYN_CONNECT"} \
    ${ZDYN_PREFILL_QUEUE:+--prefill-queue "$ZDYN_PREFILL_QUEUE"} \
    "$@"
