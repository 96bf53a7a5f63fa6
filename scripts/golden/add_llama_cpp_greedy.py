#!/usr/bin/env python3
"""Adds llama.cpp's greedy continuation of each non-chat prompt to a GGUF golden file.

`make_gguf_golden.py` writes transformers' float32 references. The engine computes Q4_0 /
Q4_1 / Q8_0 / k-quant projections as llama.cpp does (activations quantized to int8 per
block), so its greedy text is also compared with llama-server's on the same file: this
script asks a running `llama-server -m FILE -t 2` for 24 greedy tokens (top_k 1) of each
prompt and stores them as `llama_cpp_greedy`.

    llama-server -m FILE.gguf --port 18731 -t 2 -c 512 &
    .venv/bin/python scripts/golden/add_llama_cpp_greedy.py \
        --golden worker/tests/golden/gguf/smollm2_q4_1.json --server http://127.0.0.1:18731 \
        --version "llama-server 0c1e570 (llama-cpp-python 0.3.36 sdist)"
"""

import argparse
import json
import pathlib
import urllib.request


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--golden", type=pathlib.Path, required=True)
    ap.add_argument("--server", default="http://127.0.0.1:18731")
    ap.add_argument("--version", required=True, help="which llama.cpp build answered")
    args = ap.parse_args()
    golden = json.loads(args.golden.read_text())
    for case in golden["cases"]:
        if "chat" in case:
            continue
        body = {
            "prompt": case["ids"],
            "n_predict": golden["new_tokens"],
            "temperature": 0,
            "top_k": 1,
            "cache_prompt": False,
            "ignore_eos": True,
            "return_tokens": True,
        }
        req = urllib.request.Request(
            f"{args.server}/completion",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req) as r:
            case["llama_cpp_greedy"] = json.load(r)["tokens"]
    golden["llama_cpp"] = (
        f"{args.version} on the same file, -t 2, top_k 1: greedy ids of the non-chat prompts"
    )
    args.golden.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
