#!/usr/bin/env bash
# Speculative decoding against plain decoding (docs/bench/speculative.md): one
# `llmapi-launch serve` without and one per `speculative_config`, the same workloads through
# llmapi-bench on each, side by side in one run. Workloads: (a) edit, a chat request that
# asks to copy a paragraph back with one change (the output repeats the prompt), (b) random
# token ids, greedy, and (c) random token ids sampled at temperature 1 (text that drafts
# rarely predict: the cost of speculation). Each at batch 1 and at concurrency 4. Tables:
# `ngram` (NGram drafts) and `draft` (DraftTarget, with the model as its own draft, where
# greedy acceptance must be 1.0 and the table shows the cost of drafting, and with a draft
# cut to its first DRAFT_LAYERS layers by `make-model --from`, for a realistic acceptance;
# the cut needs a checkpoint directory, not a GGUF file, and with DRAFT_MODEL, any other
# checkpoint with the model's tokenizer, such as a quantized GGUF file of the same model).
# Each table shows output tok/s,
# mean TPOT, mean Request AR (avg_decoded_tokens_per_iter) and whether the generated texts of
# the servers are identical.
#
#   MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf scripts/bench_speculative.sh
#   TABLES=draft PROMPTS=4 OUTPUT_LEN=48 scripts/bench_speculative.sh   # bench preset
#
# Knobs (environment): MODEL (default: $LLMAPI_SMOLLM2_GGUF, else the bench preset),
# PROFILE (debug), PROMPTS (8), OUTPUT_LEN (96), DRAFT (4: max_draft_len), TABLES ("ngram
# draft"), WORKLOADS ("edit random sampled"), DRAFT_LAYERS (half the model's layers; 0: no
# cut draft), DRAFT_MODEL (unset: no such column), THREADS
# (unset: the engine's default), SERVE_ARGS (more `serve` flags for every server, plain
# included: SERVE_ARGS="--tp_size 2" compares a tensor-parallel group with and without
# speculation, the DraftTarget draft on its rank 0). The binaries must be built (cargo
# build --workspace, or --release).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-debug}
PROMPTS=${PROMPTS:-8}
OUTPUT_LEN=${OUTPUT_LEN:-96}
DRAFT=${DRAFT:-4}
TABLES=${TABLES:-ngram draft}
WORKLOADS=${WORKLOADS:-edit random sampled}
read -ra SERVE_FLAGS <<<"${SERVE_ARGS:-}"
BIN=target/$PROFILE
WORK=$(mktemp -d /tmp/llmapi-specbench.XXXXXX)
# shellcheck source=lib/processes.sh
. scripts/lib/processes.sh

MODEL=${MODEL:-${LLMAPI_SMOLLM2_GGUF:-}}
if [ -z "$MODEL" ]; then
  MODEL=$WORK/model
  "$BIN/llmapi-launch" make-model --preset bench --out "$MODEL" >/dev/null
fi

printf 'speculative_config:\n  decoding_type: NGram\n  max_draft_len: %s\n' "$DRAFT" >"$WORK/ngram.yml"

# (a) edit requests: each asks to copy a different paragraph back with one word changed.
python3 - "$WORK/edit.jsonl" "$PROMPTS" "$OUTPUT_LEN" <<'EOF2'
import json, sys
path, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paras = [
    "The lighthouse keeper climbed the stairs every evening at dusk. He polished the great lens, trimmed the wick and wrote the weather in his log before the first ships passed the point.",
    "Our team meets on Mondays to plan the week. Each person lists the tasks they will finish, the help they need and the risks they see, and the notes are shared with everyone after lunch.",
    "To bake the bread, mix the flour, water, salt and yeast, then knead the dough for ten minutes. Let it rise for an hour, shape it into a loaf and bake it until the crust is brown.",
    "The river runs north through the valley and past the old mill. In spring the water is high and fast, and in late summer children wade across it to reach the orchard on the far bank.",
]
with open(path, "w") as f:
    for i in range(n):
        p = paras[i % len(paras)]
        msg = f"Rewrite the following text exactly as it is, but replace the word 'the' at its start with 'A'.\n\n{p}\n\n{p}"
        f.write(json.dumps({"input": {"messages": [{"role": "user", "content": msg}], "max_tokens": out}}) + "\n")
EOF2

bench() { # port workload concurrency name
  local args=(--temperature 0)
  if [ "$2" = edit ]; then
    args+=(--backend openai-chat --dataset-name custom --dataset-path "$WORK/edit.jsonl")
  else
    [ "$2" = sampled ] && args=(--temperature 1)
    args+=(--backend openai --dataset-name random --random-input-len 256
      --random-output-len "$OUTPUT_LEN" --ignore-eos --tokenize-on-client)
  fi
  "$BIN/llmapi-bench" --model "$MODEL" --base-url "http://127.0.0.1:$1" "${args[@]}" \
    --num-prompts "$PROMPTS" --max-concurrency "$3" --seed 7 \
    --save-result --save-detailed --result-dir "$WORK" --result-filename "$4.json" >"$WORK/bench-$4.log" 2>&1
}

# Not run in a subshell: the server's pid must reach PIDS here, so that it is killed on exit.
start() { # name extra-args... ; sets PORT[name]
  local name=$1 port
  shift
  port=$(free_port)
  "$BIN/llmapi-launch" serve "$MODEL" --host 127.0.0.1 --port "$port" \
    --max_batch_size 4 "${SERVE_FLAGS[@]}" "$@" >"$WORK/serve-$name.log" 2>&1 &
  PIDS+=($!)
  wait_http "$port" /health 300
  PORT[$name]=$port
}

# compare NAME... : one row per workload and concurrency, plain against each NAME's server.
compare() {
  local names=("$@") header="| workload | concurrency | plain tok/s |" rule="|---|---|---|"
  for n in "${names[@]}"; do
    header+=" $n tok/s | $n TPOT | $n AR |"
    rule+="---|---|---|"
  done
  echo "$header plain TPOT | same text |"
  echo "$rule---|---|"
  for workload in $WORKLOADS; do
    for c in 1 4; do
      bench "$plain" "$workload" "$c" "plain-$workload-$c"
      for n in "${names[@]}"; do
        bench "${PORT[$n]}" "$workload" "$c" "$n-$workload-$c"
      done
      python3 - "$WORK" "$workload" "$c" "${names[@]}" <<'EOF2'
import json, sys
work, w, c, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
a = json.load(open(f"{work}/plain-{w}-{c}.json"))
row = f"| {w} | {c} | {a['output_throughput']:.1f} |"
same = True
for n in names:
    b = json.load(open(f"{work}/{n}-{w}-{c}.json"))
    ar = b["avg_decoded_tokens_per_iter"]["mean"]
    x, y = a["output_throughput"], b["output_throughput"]
    row += f" {y:.1f} ({y / x:.2f}x) | {b['mean_tpot_ms']:.1f} ms | {ar:.2f} |"
    same = same and a["generated_texts"] == b["generated_texts"]
same = "n/a (sampled)" if w == "sampled" else ("yes" if same else "no")
print(f"{row} {a['mean_tpot_ms']:.1f} ms | {same} |")
EOF2
    done
  done
}

declare -A PORT
start plain
plain=${PORT[plain]}
echo "$PROFILE build, model $MODEL, $PROMPTS prompts x $OUTPUT_LEN output tokens," \
  "max_draft_len $DRAFT, serve flags: ${SERVE_ARGS:-none}; logs in $WORK"
for table in $TABLES; do
  echo
  case $table in
    ngram)
      start ngram --extra_llm_api_options "$WORK/ngram.yml"
      compare ngram
      ;;
    draft)
      draft_yaml() { # name draft-dir
        printf 'speculative_config:\n  decoding_type: DraftTarget\n  max_draft_len: %s\n  speculative_model_dir: %s\n' \
          "$DRAFT" "$2" >"$WORK/$1.yml"
      }
      draft_yaml self "$MODEL"
      start self --extra_llm_api_options "$WORK/self.yml"
      names=(self)
      if [ -d "$MODEL" ] && [ "${DRAFT_LAYERS:-}" != 0 ]; then
        layers=${DRAFT_LAYERS:-$(python3 -c 'import json,sys; print(max(1, json.load(open(sys.argv[1]))["num_hidden_layers"] // 2))' "$MODEL/config.json")}
        "$BIN/llmapi-launch" make-model --from "$MODEL" --num_layers "$layers" --out "$WORK/cut" >/dev/null
        draft_yaml cut "$WORK/cut"
        start cut --extra_llm_api_options "$WORK/cut.yml"
        names+=(cut)
        echo "DraftTarget: self = the model as its own draft; cut = its first $layers layers"
      else
        echo "DraftTarget: self = the model as its own draft (no cut draft: it needs a checkpoint directory and DRAFT_LAYERS > 0)"
      fi
      if [ -n "${DRAFT_MODEL:-}" ]; then
        draft_yaml given "$DRAFT_MODEL"
        start given --extra_llm_api_options "$WORK/given.yml"
        names+=(given)
        echo "DraftTarget: given = $DRAFT_MODEL"
      fi
      echo
      compare "${names[@]}"
      ;;
    *) echo "unknown table $table (ngram, draft)" >&2; exit 2 ;;
  esac
done
