#!/usr/bin/env bash
# Start the agg_route scenario in the background: the frontend, the KV router and ZDYN_NUM_WORKERS
# workers (default 2). With ZDYN_ROUTER_IN_PROCESS=1 the frontend routes itself and no router process
# runs. Ctrl-C stops all of it. Flags after run.sh go to every worker.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../common.sh"
ZDYN_NUM_WORKERS=${ZDYN_NUM_WORKERS:-2}
ZDYN_WORKERS_PORT=${ZDYN_WORKERS_PORT:-5555}   # frontend's hub
ZDYN_ROUTER_PORT=${ZDYN_ROUTER_PORT:-5570}     # router: processors ask here
ZDYN_ROUTER_WORKERS_PORT=${ZDYN_ROUTER_WORKERS_PORT:-$((ZDYN_ROUTER_PORT + 1))}   # router: workers register here

if [ "${ZDYN_ROUTER_IN_PROCESS:-0}" = 1 ]; then
    start frontend "$here/frontend.sh" --workers-endpoint "tcp://*:$ZDYN_WORKERS_PORT" --router-endpoint "" \
        --router-mode "${ZDYN_ROUTER_MODE:-kv}"
    export ZDYN_CONNECT=${ZDYN_CONNECT:-tcp://127.0.0.1:$ZDYN_WORKERS_PORT}
else
    start router "$here/router.sh" --endpoint "tcp://*:$ZDYN_ROUTER_PORT" \
        --workers-endpoint "tcp://*:$ZDYN_ROUTER_WORKERS_PORT" --router-mode "${ZDYN_ROUTER_MODE:-kv}"
    start frontend "$here/frontend.sh" --workers-endpoint "tcp://*:$ZDYN_WORKERS_PORT" \
        --router-endpoint "tcp://127.0.0.1:$ZDYN_ROUTER_PORT"
    export ZDYN_CONNECT=${ZDYN_CONNECT:-tcp://127.0.0.1:$ZDYN_WORKERS_PORT,tcp://127.0.0.1:$ZDYN_ROUTER_WORKERS_PORT}
fi
for i in $(seq 0 $((ZDYN_NUM_WORKERS - 1))); do
    start "worker$i" "$here/worker.sh" --worker-id "worker$i" "$@"
done
wait_for_workers "$ZDYN_NUM_WORKERS"
model=$(curl -s "http://$ZDYN_HOST:$ZDYN_PORT/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
cat <<TXT
try (the second request shares the first one's long prefix, goes to the same worker and reports cached tokens):
  curl -s http://$ZDYN_HOST:$ZDYN_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$model", "messages": [{"role": "system", "content": "$(printf 'You are a helpful assistant. %.0s' $(seq 40))"}, {"role": "user", "content": "What is the capital of France?"}], "max_tokens": 20}'
TXT
serve_until_stopped
