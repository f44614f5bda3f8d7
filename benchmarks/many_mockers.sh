#!/usr/bin/env bash
# 16 simulated workers on one box: as 16 processes and as one process with --num-workers 16; RSS and CPU under load.
# Takes the shared benchmark lock. Usage: bash benchmarks/many_mockers.sh
set -e
exec 9>/tmp/zdyn-bench.lock; flock 9
M=$(python3 -m zdyn.models tiny "${ZDYN_CACHE_DIR:-$HOME/.cache/zdyn}/models/tiny-llama" 2>/dev/null)
rss() { for p in "$@"; do awk '/VmRSS/{print $2}' /proc/$p/status; done | awk '{s+=$1; n++} END {printf "%d procs, total %.0f MiB, mean %.1f MiB\n", n, s/1024, s/1024/n}'; }
cpu() { for p in "$@"; do awk '{print $14+$15}' /proc/$p/stat; done | awk '{s+=$1} END {print s}'; }
for mode in procs one; do
  zdyn frontend --model $M --port 8200 --workers-endpoint tcp://127.0.0.1:5755 --log-level warning > fe-$mode.log 2>&1 & FE=$!
  pids=()
  if [ $mode = procs ]; then
    for i in $(seq 0 15); do zdyn worker --engine mocker --model $M --connect tcp://127.0.0.1:5755 --max-model-len 2048 --log-level warning > w$i.log 2>&1 & pids+=($!); done
  else
    zdyn worker --engine mocker --num-workers 16 --model $M --connect tcp://127.0.0.1:5755 --max-model-len 2048 --log-level warning > w.log 2>&1 & pids+=($!)
  fi
  for t in $(seq 60); do sleep 1; n=$(curl -sf localhost:8200/health | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["workers"]))' 2>/dev/null || echo 0); [ "$n" = 16 ] && break; done
  echo "== mode=$mode: $n workers live after ${t}s"; echo -n "idle RSS: "; rss "${pids[@]}"
  c0=$(cpu "${pids[@]}"); f0=$(cpu $FE)
  zdyn bench --base-url http://127.0.0.1:8200 --tokenizer $M --dataset random --input-len 512 --output-len 64 --ignore-eos --request-rate 16 --duration 20 --no-progress 2>&1 | grep -E "Successful|Request throughput|Median TTFT|Median ITL"
  c1=$(cpu "${pids[@]}"); f1=$(cpu $FE)
  echo -n "loaded RSS: "; rss "${pids[@]}"
  echo "CPU during 20 s at 16 req/s: workers $(( (c1-c0) ))/100 s total, frontend $(( (f1-f0) ))/100 s"
  kill ${pids[@]} $FE; wait 2>/dev/null || true
done
