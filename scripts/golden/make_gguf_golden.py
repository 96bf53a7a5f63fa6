#!/usr/bin/env python3
"""Write the GGUF golden fixture: greedy completions of a real GGUF checkpoint
as transformers' own GGUF loader computes them.

transformers reads the GGUF file (dequantizing every tensor to float32 and
undoing llama.cpp's Q/K row permutation) and builds the tokenizer from the
file's ``tokenizer.ggml.*`` metadata. For each prompt the script records the
prompt's token ids, the greedy continuation's ids and text, and the top-1 minus
top-2 logit margin of every greedy step, so that the Rust test can say which
steps a bf16 engine must reproduce exactly (docs: scripts/golden/README.md).

Run by developers, never by CI:

    .venv/bin/python scripts/golden/make_gguf_golden.py \\
        --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out worker/tests/golden/gguf/smollm2_q4_1.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW_TOKENS = 24
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy decode, recomputing the whole sequence each step (no KV cache)."""
    ids = list(prompt)
    margins = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            last = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            top2 = torch.topk(last, 2).values
            margins.append(round(float(top2[0] - top2[1]), 4))
            ids.append(int(torch.argmax(last).item()))
    return ids[len(prompt) :], margins


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    d, f = str(args.gguf.parent), args.gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    cases = []
    for text in PROMPTS:
        cases.append({"prompt": text, "ids": tok(text)["input_ids"]})
    chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    cases.append({"prompt": chat_text, "ids": tok(chat_text, add_special_tokens=False)["input_ids"], "chat": CHAT})
    for c in cases:
        out, margins = greedy(model, c["ids"])
        c["greedy"] = out
        c["greedy_text"] = tok.decode(out)
        c["margins"] = margins
    golden = {
        "file": args.gguf.name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "new_tokens": NEW_TOKENS,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(golden, indent=1) + "\n")
    for c in cases:
        print(repr(c["prompt"][-40:]), "->", repr(c["greedy_text"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
