#!/usr/bin/env bash
# llmapi against llama.cpp on the same GGUF files, on this machine, in one run
# (docs/bench/gguf.md). For each file:
#   1. llama-bench -t 2: prefill (pp512) and batch-1 decode (tg128) tok/s, llama.cpp alone;
#   2. llama-server -np 16 -cb and llmapi-launch serve, each driven by the same client
#      (llmapi-bench, random prompts, --ignore-eos): concurrency 1 with 512-token prompts
#      (prefill tok/s = 512 / mean TTFT, decode tok/s = 1000 / median TPOT) and concurrency 16
#      with 128-token prompts and 128 output tokens (output tok/s, mean TTFT).
#
#   LLAMA_CPP=/path/to/llama.cpp/build/bin scripts/bench_llamacpp.sh A.gguf [B.gguf ...]
#
# llama.cpp builds from the llama-cpp-python sdist on PyPI, which vendors it (see
# docs/bench/gguf.md for the exact commands). Knobs: PROFILE (release), PROMPTS_C16 (64),
# THREADS (2), LLMAPI_ARGS ("--dtype bfloat16": bf16 products, as llama.cpp computes BF16 files).
# The llmapi binaries must be built (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_CPP:?set LLAMA_CPP to the directory holding llama-bench and llama-server}"
PROFILE=${PROFILE:-release}
PROMPTS_C16=${PROMPTS_C16:-64}
THREADS=${THREADS:-2}
LLMAPI_ARGS=${LLMAPI_ARGS:---dtype bfloat16}
BIN=target/$PROFILE
[ $# -gt 0 ] || { echo "usage: LLAMA_CPP=DIR $0 FILE.gguf..." >&2; exit 2; }
WORK=$(mktemp -d /tmp/llmapi-llamacpp.XXXXXX)
# shellcheck source=lib/processes.sh
. scripts/lib/processes.sh

# llmapi-bench against a server; prints "c1 prefill tok/s, c1 decode tok/s, c16 output tok/s,
# c16 mean TTFT ms".
client() { # model port tag
  local model=$1 port=$2 tag=$3
  "$BIN/llmapi-bench" --backend openai --model "$model" --port "$port" \
    --dataset-name random --random-input-len 512 --random-output-len 64 --ignore-eos \
    --num-prompts 6 --max-concurrency 1 --disable-tqdm --percentile-metrics ttft,tpot \
    --save-result --result-dir "$WORK" --result-filename "$tag-c1.json" >"$WORK/$tag-c1.log"
  "$BIN/llmapi-bench" --backend openai --model "$model" --port "$port" \
    --dataset-name random --random-input-len 128 --random-output-len 128 --ignore-eos \
    --num-prompts "$PROMPTS_C16" --max-concurrency 16 --disable-tqdm \
    --percentile-metrics ttft,tpot --save-result --result-dir "$WORK" \
    --result-filename "$tag-c16.json" >"$WORK/$tag-c16.log"
  python3 - "$WORK/$tag-c1.json" "$WORK/$tag-c16.json" <<'EOF'
import json, sys
c1, c16 = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{512 / (c1['mean_ttft_ms'] / 1000):.0f} {1000 / c1['median_tpot_ms']:.1f} "
      f"{c16['output_throughput']:.1f} {c16['mean_ttft_ms']:.0f}")
EOF
}

printf '%s\n' "| file | engine | pp512 tok/s (llama-bench) | tg128 tok/s (llama-bench) | c=1 prefill tok/s | c=1 decode tok/s | c=16 output tok/s | c=16 mean TTFT ms |" \
  "|---|---|---|---|---|---|---|---|"
for file in "$@"; do
  name=$(basename "$file" .gguf)
  echo "# $name: load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  "$LLAMA_CPP/llama-bench" -m "$file" -t "$THREADS" -p 512 -n 128 -r 3 -o csv \
    >"$WORK/$name-llama-bench.csv" 2>"$WORK/$name-llama-bench.log"
  read -r pp tg < <(python3 - "$WORK/$name-llama-bench.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
pp = next(float(r["avg_ts"]) for r in rows if int(r["n_prompt"]) > 0)
tg = next(float(r["avg_ts"]) for r in rows if int(r["n_gen"]) > 0)
print(f"{pp:.0f} {tg:.1f}")
EOF
)

  port=$(free_port)
  "$LLAMA_CPP/llama-server" -m "$file" -t "$THREADS" -tb "$THREADS" -np 16 -cb \
    -c $((16 * 1024)) --port "$port" >"$WORK/$name-llama-server.log" 2>&1 &
  PIDS+=($!)
  wait_http "$port" /health 120
  read -r a b c d < <(client "$file" "$port" "$name-llama")
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
  echo "| $name | llama.cpp | $pp | $tg | $a | $b | $c | $d |"

  port=$(free_port)
  "$BIN/llmapi-launch" serve "$file" --port "$port" --kv_cache_free_gpu_memory_fraction 0.1 $LLMAPI_ARGS \
    >"$WORK/$name-llmapi.log" 2>&1 &
  PIDS+=($!)
  wait_http "$port" /health 300
  read -r a b c d < <(client "$file" "$port" "$name-llmapi")
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
  echo "| $name | llmapi | | | $a | $b | $c | $d |"
done
echo "# logs and result files: $WORK" >&2
trap - EXIT
