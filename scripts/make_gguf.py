#!/usr/bin/env python3
"""Writes one of this project's HF checkpoints (Llama architecture: config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) as a bf16 GGUF file laid out as
llama.cpp's own converter lays out a Llama model, so that llama.cpp and llmapi can be compared
on the same file. Quantize the result with llama.cpp's `llama-quantize` (Q8_0, Q4_K_M, ...).

llama.cpp's converter refuses tokenizers whose pre-tokenizer it does not recognise by hash;
the project's BPE tokenizers split text with GPT-2's byte-level regex, so this script writes
`tokenizer.ggml.pre = "gpt-2"` itself, which is what that converter would choose for them.

    .venv/bin/python scripts/make_gguf.py /tmp/bench /tmp/bench-bf16.gguf
    llama-quantize /tmp/bench-bf16.gguf /tmp/bench-Q8_0.gguf Q8_0

Needs torch, safetensors and gguf (scripts/golden/requirements.txt plus `pip install gguf`).
"""

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

# HF tensor name suffix -> GGUF tensor name (blk.N. prefix added for layers).
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def rotary_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorders each head's rows from HF's half-split rotary layout to llama.cpp's
    interleaved one, as llama.cpp's converter does for Q and K of Llama models."""
    rows = w.shape[0]
    return (
        w.reshape(heads, 2, rows // heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf: str) -> str:
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"]:
        suffix = ".".join(parts[3:])
        if suffix in LAYER_NAMES:
            return f"blk.{parts[2]}.{LAYER_NAMES[suffix]}"
    raise SystemExit(f"tensor {hf} has no GGUF name; only Llama-architecture checkpoints are supported")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--name", help="general.name (default: the directory's name)")
    args = ap.parse_args()

    cfg = json.loads((args.model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"model_type {cfg.get('model_type')!r}: only llama is supported")
    tok = json.loads((args.model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((args.model_dir / "tokenizer_config.json").read_text())
    if tok["model"]["type"] != "BPE" or (tok.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise SystemExit("only byte-level BPE tokenizers (GPT-2 style) are supported")

    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)

    w = gguf.GGUFWriter(str(args.out), "llama")
    w.add_name(args.name or args.model_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    # Tokenizer: ids in order, specials as control tokens, merges as "a b".
    vocab = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    size = cfg["vocab_size"]
    tokens = [""] * size
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(size):
        if not tokens[i]:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids[tok_cfg["bos_token"]])
    w.add_eos_token_id(ids[tok_cfg["eos_token"]])
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
    if "chat_template" in tok_cfg:
        w.add_chat_template(tok_cfg["chat_template"])

    state = {}
    for f in sorted(args.model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for hf, t in sorted(state.items()):
        name = gguf_name(hf)
        if hf.endswith("q_proj.weight"):
            t = rotary_permute(t, heads)
        elif hf.endswith("k_proj.weight"):
            t = rotary_permute(t, kv_heads)
        if t.dim() == 1:
            # llama.cpp keeps norm weights in f32.
            w.add_tensor(name, t.float().numpy())
        else:
            raw = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, {len(state)} tensors)")


if __name__ == "__main__":
    main()
