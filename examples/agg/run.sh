#!/usr/bin/env bash
# Start the agg scenario in the background: the frontend and ZDYN_NUM_WORKERS workers (optionally
# ZDYN_NUM_PROCESSORS separate processors). Ctrl-C stops all of it. Flags after run.sh go to every worker.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../common.sh"
ZDYN_NUM_WORKERS=${ZDYN_NUM_WORKERS:-1}
ZDYN_NUM_PROCESSORS=${ZDYN_NUM_PROCESSORS:-0}
ZDYN_PROCESSORS_PORT=${ZDYN_PROCESSORS_PORT:-5550}      # frontend <- processors; processor i takes +1+i

if [ "$ZDYN_NUM_PROCESSORS" -gt 0 ]; then
    start frontend env ZDYN_PROCESSORS_ENDPOINT="tcp://*:$ZDYN_PROCESSORS_PORT" "$here/frontend.sh"
    connect=""
    for i in $(seq 0 $((ZDYN_NUM_PROCESSORS - 1))); do
        port=$((ZDYN_PROCESSORS_PORT + 1 + i))
        start "processor$i" env ZDYN_FRONTEND="tcp://127.0.0.1:$ZDYN_PROCESSORS_PORT" "$here/processor.sh" \
            --workers-endpoint "tcp://*:$port" --processor-id "processor$i"
        connect="${connect:+$connect,}tcp://127.0.0.1:$port"
    done
    export ZDYN_CONNECT=$connect
else
    start frontend "$here/frontend.sh"
fi
for i in $(seq 0 $((ZDYN_NUM_WORKERS - 1))); do
    start "worker$i" "$here/worker.sh" --worker-id "worker$i" "$@"
done
wait_for_workers "$ZDYN_NUM_WORKERS"
cat <<TXT
try:
  curl -s http://$ZDYN_HOST:$ZDYN_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$(curl -s "http://$ZDYN_HOST:$ZDYN_PORT/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 40}'
TXT
serve_until_stopped
