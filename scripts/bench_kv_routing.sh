#!/usr/bin/env bash
# kv_cache_aware against round_robin on a shared-prefix workload (docs/bench/kv_routing.md):
# two workers and one llmapi-router on loopback, llmapi-bench with a few long system prompts
# each followed by a short random question. Each policy gets freshly started workers (cold
# caches); the table shows the workers' prefix-cache hit rate (from the router's /metrics)
# and llmapi-bench's mean TTFT.
#
#   scripts/bench_kv_routing.sh                  # debug binaries, demo model
#   PROFILE=release PRESET=bench scripts/bench_kv_routing.sh
#
# Knobs (environment): PROFILE (debug), PRESET (demo), PROMPTS (96), CONCURRENCY (4),
# PREFIXES (8), PREFIX_LEN (512), QUESTION_LEN (32), OUTPUT_LEN (8), KV_TOKENS (3072: each
# worker's KV pool, smaller than all prefixes together so that placement matters), KV_WEIGHT
# (1.0: the router's --kv_overlap_score_weight).
# The binaries must be built (cargo build --workspace, or --release).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-debug}
PRESET=${PRESET:-demo}
PROMPTS=${PROMPTS:-96}
CONCURRENCY=${CONCURRENCY:-4}
PREFIXES=${PREFIXES:-8}
PREFIX_LEN=${PREFIX_LEN:-512}
QUESTION_LEN=${QUESTION_LEN:-32}
OUTPUT_LEN=${OUTPUT_LEN:-8}
KV_TOKENS=${KV_TOKENS:-3072}
KV_WEIGHT=${KV_WEIGHT:-1.0}
BIN=target/$PROFILE
WORK=$(mktemp -d /tmp/llmapi-kvbench.XXXXXX)
MODEL=$WORK/model
SECRET=kv-routing-bench-secret-0123456789
# shellcheck source=lib/processes.sh
. scripts/lib/processes.sh

# Sum of a per-worker counter over the router's /metrics (OpenMetrics adds _total).
metric_sum() { # port name
  curl -sf "http://127.0.0.1:$1/metrics" |
    awk -v n="$2" '$1 ~ "^"n"(_total)?[{]" {s += $2} END {printf "%.0f", s}'
}

"$BIN/llmapi-launch" make-model --preset "$PRESET" --out "$MODEL" >/dev/null

run_policy() { # policy
  local policy=$1 grpcs=() ports=() urls=()
  for _ in 1 2; do
    local g h
    g=$(free_port); h=$(free_port)
    LLMAPI_WORKER_ADDR=127.0.0.1:$g LLMAPI_JOB_TOKEN=$SECRET \
      "$BIN/llmapi-launch" serve "$MODEL" --host 127.0.0.1 --port "$h" \
      --set kv_cache_config.max_tokens="$KV_TOKENS" >"$WORK/worker-$policy-$g.log" 2>&1 &
    PIDS+=($!)
    grpcs+=("$g"); ports+=("$h"); urls+=("http://127.0.0.1:$g")
  done
  for h in "${ports[@]}"; do wait_http "$h" /health 120; done
  local rp
  rp=$(free_port)
  LLMAPI_WORKER_TOKEN=$SECRET "$BIN/llmapi-router" "$MODEL" --host 127.0.0.1 --port "$rp" \
    --worker_urls "$(IFS=,; echo "${urls[*]}")" --routing_policy "$policy" \
    --kv_overlap_score_weight "$KV_WEIGHT" --health_check_interval_ms 200 >"$WORK/router-$policy.log" 2>&1 &
  local router=$!
  PIDS+=($router)
  wait_http "$rp" /health 60
  "$BIN/llmapi-bench" --model "$MODEL" --backend openai --base-url "http://127.0.0.1:$rp" \
    --dataset-name random --random-prefix-len "$PREFIX_LEN" --random-num-prefixes "$PREFIXES" \
    --random-input-len "$QUESTION_LEN" --random-output-len "$OUTPUT_LEN" --ignore-eos \
    --tokenize-on-client --num-prompts "$PROMPTS" --max-concurrency "$CONCURRENCY" \
    --save-result --result-dir "$WORK" --result-filename "$policy.json" >"$WORK/bench-$policy.log" 2>&1
  sleep 1 # one health check more, so /metrics has the workers' last counters
  local hits queries
  hits=$(metric_sum "$rp" llmapi_worker_prefix_cache_hits)
  queries=$(metric_sum "$rp" llmapi_worker_prefix_cache_queries)
  python3 - "$WORK/$policy.json" "$policy" "$hits" "$queries" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
policy, hits, queries = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rate = 100.0 * hits / queries if queries else 0.0
print(f"| {policy} | {r['completed']} | {hits} / {queries} | {rate:.1f} % "
      f"| {r['mean_ttft_ms']:.1f} ms | {r['median_ttft_ms']:.1f} ms "
      f"| {r['output_throughput']:.1f} |")
EOF
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

echo "$PROFILE build, preset $PRESET, $PROMPTS prompts at concurrency $CONCURRENCY:" \
  "$PREFIXES prefixes of $PREFIX_LEN tokens + $QUESTION_LEN-token questions, $OUTPUT_LEN output" \
  "tokens, 2 workers with $KV_TOKENS KV tokens each, kv_overlap_score_weight $KV_WEIGHT;" \
  "logs in $WORK"
echo
echo "| policy | completed | prefix-cache hits / queries (tokens) | hit rate | mean TTFT | median TTFT | output tok/s |"
echo "|---|---|---|---|---|---|---|"
for policy in round_robin kv_cache_aware; do
  run_policy "$policy"
done
