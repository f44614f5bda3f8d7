#!/usr/bin/env bash
# Start the disagg_route scenario in the background: the frontend, the KV router, the prefill queue,
# ZDYN_NUM_WORKERS decode workers (default 2) and ZDYN_NUM_PREFILL_WORKERS prefill workers (default 1).
# Ctrl-C stops all of it. Flags after run.sh go to every worker.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../common.sh"
ZDYN_NUM_WORKERS=${ZDYN_NUM_WORKERS:-2}
ZDYN_NUM_PREFILL_WORKERS=${ZDYN_NUM_PREFILL_WORKERS:-1}
ZDYN_WORKERS_PORT=${ZDYN_WORKERS_PORT:-5555}   # frontend's hub (decode workers)
ZDYN_ROUTER_PORT=${ZDYN_ROUTER_PORT:-5570}     # router: processors ask here
ZDYN_ROUTER_WORKERS_PORT=${ZDYN_ROUTER_WORKERS_PORT:-$((ZDYN_ROUTER_PORT + 1))}   # router: workers register
ZDYN_QUEUE_PORT=${ZDYN_QUEUE_PORT:-5590}       # prefill queue: jobs; +1 prefill workers; +2 status

start router "$here/router.sh" --endpoint "tcp://*:$ZDYN_ROUTER_PORT" \
    --workers-endpoint "tcp://*:$ZDYN_ROUTER_WORKERS_PORT" --router-mode "${ZDYN_ROUTER_MODE:-kv}"
start frontend "$here/frontend.sh" --workers-endpoint "tcp://*:$ZDYN_WORKERS_PORT" \
    --router-endpoint "tcp://127.0.0.1:$ZDYN_ROUTER_PORT"
start prefill_queue "$here/prefill_queue.sh" --jobs-endpoint "tcp://*:$ZDYN_QUEUE_PORT" \
    --prefill-workers-endpoint "tcp://*:$((ZDYN_QUEUE_PORT + 1))" --status-endpoint "tcp://*:$((ZDYN_QUEUE_PORT + 2))"
for i in $(seq 0 $((ZDYN_NUM_PREFILL_WORKERS - 1))); do
    ZDYN_PREFILL_WORKERS_ENDPOINT=tcp://127.0.0.1:$((ZDYN_QUEUE_PORT + 1)) \
        start "prefill$i" "$here/prefill_worker.sh" --worker-id "prefill$i" "$@"
done
for i in $(seq 0 $((ZDYN_NUM_WORKERS - 1))); do
    ZDYN_CONNECT=${ZDYN_CONNECT:-tcp://127.0.0.1:$ZDYN_WORKERS_PORT,tcp://127.0.0.1:$ZDYN_ROUTER_WORKERS_PORT} \
    ZDYN_PREFILL_QUEUE=tcp://127.0.0.1:$ZDYN_QUEUE_PORT \
        start "decode$i" "$here/decode_worker.sh" --worker-id "decode$i" "$@"
done
wait_for_workers "$ZDYN_NUM_WORKERS"
echo "prefill workers join the queue as their engines come up; until then decode workers prefill locally"
echo "each decode worker logs its choice per request: grep 'prefill' $ZDYN_LOG_DIR/decode0.log"
serve_until_stopped
