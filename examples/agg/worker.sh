#!/usr/bin/env bash
# A worker: vLLM (or the mocker with ZDYN_ENGINE=mocker) serving the processor(s) at ZDYN_CONNECT.
# Every vLLM engine argument can be added: ./worker.sh --max-num-seqs 64 --dtype bfloat16
here=$(dirname "$0")
exec zdyn worker -f "${ZDYN_CONFIG:-$here/config.yaml}" \
    ${ZDYN_MODEL:+--model "$ZDYN_MODEL"} \
    ${ZDYN_ENGINE:+--engine "$ZDYN_ENGINE"} \
    ${ZDYN_CONNECT:+--connect "$ZDYN_CONNECT"} \
    "$@"
