#!/usr/bin/env python3
"""Check the golden fixtures with a second, independent forward pass.

Reads each ``worker/tests/golden/<case>/`` the way the engine must: the
safetensors files parsed by hand (bf16 widened to float), config.json in
both the transformers 4 and 5 spellings, tied embeddings, sharded index. It
then runs the decoder in float64 numpy, without transformers or torch, and
compares with ``golden.json``: logits within ``tolerance_abs`` and greedy paths
identical. It doubles as a compact statement of the math the fixtures pin.

    python scripts/golden/check_golden.py worker/tests/golden
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of one file as float64 arrays (header: u64 length, JSON)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    body = raw[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        values = np.frombuffer(body[start:end], dtype=DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = values.astype(np.float64).reshape(info["shape"])
    return tensors


def read_weights(model_dir: Path) -> dict[str, np.ndarray]:
    index = model_dir / "model.safetensors.index.json"
    if not index.exists():
        return read_safetensors(model_dir / "model.safetensors")
    weights = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        weights.update(read_safetensors(model_dir / shard))
    return weights


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or 4 `rope_theta`/`rope_scaling`."""
    if "rope_parameters" in cfg:
        params = cfg["rope_parameters"]
        scaling = params if params.get("rope_type", "default") != "default" else None
        return params["rope_theta"], scaling
    scaling = cfg.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return cfg.get("rope_theta", 10000.0), scaling


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope type {kind} is not covered by this checker")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, and the band
    # between original/low and original/high interpolated.
    smooth = (original / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > original / low, inv / factor, inv)
    in_band = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(in_band, mid, out)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Decoder:
    """Llama-family decoder (Llama, Mistral, Qwen2/3, Mixtral, Qwen MoE)."""

    def __init__(self, model_dir: Path):
        cfg = json.loads((model_dir / "config.json").read_text())
        self.cfg = cfg
        self.w = read_weights(model_dir)
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.heads
        self.eps = cfg["rms_norm_eps"]
        theta, scaling = rope_settings(cfg)
        self.inv_freq = inverse_frequencies(self.head_dim, theta, scaling)
        self.experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
        self.top_k = cfg.get("num_experts_per_tok", 0)
        # Mixtral always renormalises the chosen experts' weights.
        self.renormalise = cfg.get("norm_topk_prob", cfg["model_type"] == "mixtral")
        self.lm_head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        self.window = self.windows(cfg)

    @staticmethod
    def windows(cfg: dict) -> list[int | None]:
        """Per layer, the sliding window (a query at i sees keys j with i - j < window) or
        None: Mistral windows every layer when sliding_window is set; the Qwen classes only
        with use_sliding_window, on the layers layer_types (or max_window_layers) marks."""
        n, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
        if cfg["model_type"] in ("mistral", "mixtral"):
            return [window] * n
        if not cfg.get("use_sliding_window") or window is None:
            return [None] * n
        types = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
            for i in range(n)
        ]
        return [window if t == "sliding_attention" else None for t in types]

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[f"{name}.weight"].T
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def rope(self, x: np.ndarray) -> np.ndarray:
        """Rotate halves (not interleaved pairs), as transformers does."""
        angles = np.arange(x.shape[1])[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(angles)[None], np.sin(angles)[None]
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def attention(self, x: np.ndarray, p: str, window: int | None) -> np.ndarray:
        t = x.shape[0]
        q = self.linear(x, f"{p}.q_proj").reshape(t, self.heads, self.head_dim).transpose(1, 0, 2)
        k = (
            self.linear(x, f"{p}.k_proj")
            .reshape(t, self.kv_heads, self.head_dim)
            .transpose(1, 0, 2)
        )
        v = (
            self.linear(x, f"{p}.v_proj")
            .reshape(t, self.kv_heads, self.head_dim)
            .transpose(1, 0, 2)
        )
        if f"{p}.q_norm.weight" in self.w:
            q = rms_norm(q, self.w[f"{p}.q_norm.weight"], self.eps)
            k = rms_norm(k, self.w[f"{p}.k_norm.weight"], self.eps)
        q, k = self.rope(q), self.rope(k)
        group = self.heads // self.kv_heads
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(self.head_dim)
        seen = np.tril(np.ones((t, t), dtype=bool))
        if window is not None:
            seen &= np.triu(np.ones((t, t), dtype=bool), 1 - window)
        scores = np.where(seen, scores, -np.inf)
        out = (softmax(scores) @ v).transpose(1, 0, 2).reshape(t, self.heads * self.head_dim)
        return self.linear(out, f"{p}.o_proj")

    def mlp(self, x: np.ndarray, p: str, names=("gate_proj", "up_proj", "down_proj")) -> np.ndarray:
        gate, up, down = names
        return self.linear(
            silu(self.linear(x, f"{p}.{gate}")) * self.linear(x, f"{p}.{up}"), f"{p}.{down}"
        )

    def is_sparse(self, layer: int) -> bool:
        if self.experts == 0 or layer in self.cfg.get("mlp_only_layers", []):
            return False
        return (layer + 1) % self.cfg.get("decoder_sparse_step", 1) == 0

    def moe(self, x: np.ndarray, layer: int) -> np.ndarray:
        mixtral = self.cfg["model_type"] == "mixtral"
        p = f"model.layers.{layer}.{'block_sparse_moe' if mixtral else 'mlp'}"
        probs = softmax(self.linear(x, f"{p}.gate"))
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, : self.top_k]
        out = np.zeros_like(x)
        for row in range(x.shape[0]):
            weights = probs[row, chosen[row]]
            if self.renormalise:
                weights = weights / weights.sum()
            for expert, weight in zip(chosen[row], weights):
                names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
                out[row] += weight * self.mlp(x[row : row + 1], f"{p}.experts.{expert}", names)[0]
        if f"{p}.shared_expert_gate.weight" in self.w:
            gate = 1.0 / (1.0 + np.exp(-self.linear(x, f"{p}.shared_expert_gate")))
            out += gate * self.mlp(x, f"{p}.shared_expert")
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        h = self.w["model.embed_tokens.weight"][ids]
        for layer in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            h = h + self.attention(
                rms_norm(h, self.w[f"{p}.input_layernorm.weight"], self.eps), f"{p}.self_attn",
                self.window[layer],
            )
            x = rms_norm(h, self.w[f"{p}.post_attention_layernorm.weight"], self.eps)
            h = h + (self.moe(x, layer) if self.is_sparse(layer) else self.mlp(x, f"{p}.mlp"))
        return rms_norm(h, self.w["model.norm.weight"], self.eps) @ self.lm_head.T


def check_case(case_dir: Path) -> bool:
    golden = json.loads((case_dir / "golden.json").read_text())
    decoder = Decoder(case_dir)
    tol = golden["tolerance_abs"]
    worst = max(
        float(np.abs(decoder.logits(p) - np.array(ref)).max())
        for p, ref in zip(golden["prompts"], golden["logits"])
    )
    greedy_ok = 0
    for prompt, expected in zip(golden["prompts"], golden["greedy"]):
        ids = list(prompt)
        for _ in range(golden["max_new_tokens"]):
            ids.append(int(np.argmax(decoder.logits(ids)[-1])))
        greedy_ok += ids[len(prompt) :] == expected
    ok = worst <= tol and greedy_ok == len(golden["prompts"])
    print(
        f"{case_dir.name:16} {'ok  ' if ok else 'FAIL'} max|logit diff| {worst:.2e} "
        f"(tolerance {tol:g})  greedy paths equal {greedy_ok}/{len(golden['prompts'])}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="e.g. worker/tests/golden")
    args = parser.parse_args()
    cases = sorted(d for d in args.root.iterdir() if (d / "golden.json").exists())
    if not cases:
        parser.error(f"no <case>/golden.json under {args.root}; run make_golden.py first")
    results = [check_case(d) for d in cases]
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
