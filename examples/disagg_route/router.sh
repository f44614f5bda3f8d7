#!/usr/bin/env bash
# The KV-aware router: workers register at :5571 (announcing their KV-event publishers), processors ask
# at :5570. Extra flags are passed on: ./router.sh --router-mode kv-load --metrics-port 9100
here=$(dirname "$0")
exec zdyn router -f "${ZDYN_CONFIG:-$here/config.yaml}" "$@"
