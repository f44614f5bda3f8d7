#!/usr/bin/env bash
# A prefill worker: takes prefill jobs from the prefill queue (ZDYN_PREFILL_WORKERS_ENDPOINT, the queue's
# :5591; default: the config's PrefillWorker connect), runs each prompt, keeps its KV for the decode worker
# to pull (NIXL) and reports where it is.
# Start it on any host, at any time: ZDYN_PREFILL_WORKERS_ENDPOINT=tcp://QUEUE_HOST:5591 ./prefill_worker.sh
here=$(dirname "$0")
exec zdyn worker -f "${ZDYN_CONFIG:-$here/config.yaml}" --prefill \
    ${ZDYN_MODEL:+--model "$ZDYN_MODEL"} \
    ${ZDYN_ENGINE:+--engine "$ZDYN_ENGINE"} \
    ${ZDYN_PREFILL_WORKERS_ENDPOINT:+--connect "$ZDYN_PREFILL_WORKERS_ENDPOINT"} \
    "$@"
