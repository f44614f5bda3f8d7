#!/usr/bin/env bash
# The prefill queue: decode workers push jobs to :5590, prefill workers register at :5591, queue depth is
# published on :5592. Extra flags are passed on: ./prefill_queue.sh --max-attempts 3
here=$(dirname "$0")
exec zdyn prefill-queue -f "${ZDYN_CONFIG:-$here/config.yaml}" "$@"
