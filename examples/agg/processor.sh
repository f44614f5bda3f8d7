#!/usr/bin/env bash
# A separate processor (chat template, tokenization, detokenization, worker choice): run several to
# spread tokenization over cores. It registers with the frontend and workers connect to it.
#   ZDYN_FRONTEND=tcp://fe-host:5550 ./processor.sh --workers-endpoint tcp://*:5556
here=$(dirname "$0")
exec zdyn processor -f "${ZDYN_CONFIG:-$here/config.yaml}" \
    ${ZDYN_MODEL:+--model "$ZDYN_MODEL"} \
    ${ZDYN_FRONTEND:+--frontend "$ZDYN_FRONTEND"} \
    "$@"
