#!/usr/bin/env bash
# Start the agg scenario in the background: the frontend and ZDYN_NUM_WORKERS workers (optionally
# ZDYN_NUM_PROCESSORS separate processors). Ctrl-C stops all of it. Flags after run.sh go to every worker.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../common.sh"
ZDYN_NUM_WORKERS=${ZDYN_NUM_WORKERS:-1}
ZDYN_NUM_PROCESSORS=${ZDYN_NUM_PROCESSORS:-0}

if [ "$ZDYN_NUM_PROCESSORS" -gt 0 ]; then
    start frontend env ZDYN_PROCESSORS_ENDPOINT=tcp://*:5550 "$here/frontend.sh"
    connect=""
    for i in $(seq 0 $((ZDYN_NUM_PROCESSORS - 1))); do
        start "processor$i" env ZDYN_FRONTEND=tcp://127.0.0.1:5550 "$here/processor.sh" \
            --workers-endpoint "tcp://*:$((5556 + i))" --processor-id "processor$i"
        connect="${connect:+$connect,}tcp://127.0.0.1:$((5556 + i))"
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
